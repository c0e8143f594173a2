"""kohya's FLUX.1 / SD 3.5 training options (sd-scripts ``flux_train_network.py``, ``sd3_train_network.py``)
→ the project's flow objective (``train.timestep_sampling`` & co.), T5 settings and network options.

The objective's options are read together, not one by one: what one means depends on others and on
kohya's defaults, which are not lorabuild's family defaults, so the imported project states every
objective setting kohya trains with. Facts from sd-scripts ``library/flux_train_utils.py``
(``get_noisy_model_input_and_timesteps``, ``apply_model_prediction_type``, its arguments) and
``library/sd3_train_utils.py``:

- FLUX: ``--timestep_sampling`` ``sigma`` (the default) draws u by ``--weighting_scheme``'s density
  (``logit_normal``: ``--logit_mean``/``--logit_std``; ``mode``: ``--mode_scale``; otherwise uniform;
  default ``uniform``) and takes the scheduler's σ at index u·1000, shifted by ``--discrete_flow_shift``
  (default 3.0). The scheduler's σ run from 1 down, so σ ≈ shift(1 − u): a logit-normal u of mean m is
  a logit-normal σ of mean −m (the mode density is symmetric). ``shift``: sigmoid(``--sigmoid_scale``·n)
  shifted; ``uniform`` and ``sigmoid`` are not shifted; ``flux_shift`` by the resolution.
  ``--guidance_scale`` defaults to 3.5. ``--model_prediction_type`` ``raw`` is the velocity as predicted,
  what lorabuild trains; kohya's default ``sigma_scaled`` (and ``additive``) are not; its loss
  weighting (``sigma_sqrt``, ``cosmap``) applies with ``sigma_scaled`` only.
- SD3: σ = shift(u), u by ``--weighting_scheme``'s density (default ``uniform``), shift
  ``--training_shift`` (default 1.0); the loss is weighted by the same scheme.
"""
from __future__ import annotations

from ..lora.flow_select import embedder_problems
from .common import flag, to_bool

FLUX_SCRIPT, SD3_SCRIPT = "flux_train_network.py", "sd3_train_network.py"
OBJECTIVE = ("timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift", "training_shift",
             "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")
T5 = {"t5xxl_max_token_length": ("textemb.t5_max_length", int), "apply_t5_attn_mask": ("textemb.apply_t5_attn_mask", None)}
# kohya network_args of networks.lora_flux / lora_sd3 → (network field, converter)
NETWORK_ARGS = {"train_double_block_indices": ("train_double_block_indices", str),
                "train_single_block_indices": ("train_single_block_indices", str),
                "train_block_indices": ("train_block_indices", str), "train_blocks": ("train_blocks", str)}


def kind(flat: dict) -> str | None:
    """"flux", "sd3" or None (an SD script) from the launched script or the network module."""
    script, module = str(flat.get("_script", "")), str(flat.get("network_module", ""))
    if script == FLUX_SCRIPT or module == "networks.lora_flux":
        return "flux"
    if script == SD3_SCRIPT or module == "networks.lora_sd3":
        return "sd3"
    return None


def map_flow(r, flat: dict, is_off) -> dict:
    """Map a FLUX/SD3 config's objective and T5 options onto ``r`` (an options.Result); returns the
    options left for the general table. An SD config's flow options are listed as not applying.
    ``is_off(key, value)``: whether a GUI's field is off (options.is_off, whose tables it reads)."""
    family = kind(flat)
    ours = [k for k in flat if k in OBJECTIVE or k in T5]
    if family is None:  # set ones listed (GUIs write every field: an empty one is off, as any other)
        for k in ours:
            if not is_off(k, flat[k]):
                r.unmapped.append(f"{k} = {flat[k]!r} (a FLUX.1 / SD 3.5 option; this is an SD script's config)")
        return {k: v for k, v in flat.items() if k not in ours or is_off(k, v)}
    rest = {k: v for k, v in flat.items() if k not in ours}
    given = {k: flat[k] for k in OBJECTIVE if k in flat and flat[k] not in ("", None)}  # a GUI's empty field: unset

    for k, (dotted, conv) in T5.items():
        if k in flat and flat[k] not in ("", None):
            value = to_bool(flat[k]) if conv is None else conv(flat[k])
            if value is False:
                r.off.append(k)
            else:
                r.set(dotted, value, k)
    (_flux if family == "flux" else _sd3)(r, given)
    if "split_qkv" not in str(flat.get("network_args", "")):  # kohya's default: one LoRA on each fused layer
        r.set("network.split_qkv", False, "split_qkv (unset: kohya's default False)")
    return rest


def _num(given: dict, key: str, default: float) -> float:
    return float(given[key]) if given.get(key) not in (None, "") else default


def _density(r, given: dict, scheme: str, negate: bool) -> str:
    """lorabuild's sampling for a density scheme; its parameters set (the logit mean negated where σ = 1 − u)."""
    if scheme == "logit_normal":
        mean = _num(given, "logit_mean", 0.0)
        r.set("train.logit_mean", -mean if negate and mean else mean, "logit_mean")
        r.set("train.logit_std", _num(given, "logit_std", 1.0), "logit_std")
        return "logit_normal"
    if scheme == "mode":
        r.set("train.mode_scale", _num(given, "mode_scale", 1.29), "mode_scale")
        return "mode"
    return "uniform"


def _unused(r, given: dict, keys, why: str) -> None:
    for k in keys:
        if k in given:
            r.unmapped.append(f"{k} = {given[k]!r} (kohya does not use it {why})")


def _flux(r, given: dict) -> None:
    sampling = str(given.get("timestep_sampling", "sigma"))
    scheme = str(given.get("weighting_scheme", "uniform"))
    source = "timestep_sampling" if "timestep_sampling" in given else "timestep_sampling's default (sigma)"
    used: set = {"timestep_sampling", "guidance_scale", "model_prediction_type", "weighting_scheme"}
    if sampling == "sigma":
        r.set("train.timestep_sampling", _density(r, given, scheme, negate=True), source)
        r.set("train.discrete_flow_shift", _num(given, "discrete_flow_shift", 3.0), "discrete_flow_shift")
        used |= {"discrete_flow_shift", "logit_mean", "logit_std", "mode_scale"}
    elif sampling in ("uniform", "sigmoid", "shift", "flux_shift"):
        r.set("train.timestep_sampling", sampling, source)
        if sampling != "uniform":
            r.set("train.sigmoid_scale", _num(given, "sigmoid_scale", 1.0), "sigmoid_scale")
            used.add("sigmoid_scale")
        # lorabuild shifts after every sampler but flux_shift: 1 where kohya does not shift
        shift = _num(given, "discrete_flow_shift", 3.0) if sampling == "shift" else 1.0
        if sampling != "flux_shift":
            r.set("train.discrete_flow_shift", shift, "discrete_flow_shift" if sampling == "shift" else source)
        used |= {"discrete_flow_shift"} if sampling == "shift" else set()
    else:
        r.unmapped.append(f"timestep_sampling = {sampling!r} (not a sampling lorabuild has: uniform, sigmoid, "
                          "logit_normal, mode, shift, flux_shift)")
    _unused(r, given, [k for k in ("logit_mean", "logit_std", "mode_scale", "sigmoid_scale", "discrete_flow_shift")
                       if k not in used], f"with timestep_sampling {sampling}")
    _unused(r, given, ["training_shift"], "for FLUX.1 (it is SD3's; discrete_flow_shift is FLUX's)")
    r.set("train.guidance_scale", _num(given, "guidance_scale", 3.5), "guidance_scale" if "guidance_scale" in given
          else "guidance_scale's default (3.5)")
    prediction = str(given.get("model_prediction_type", "sigma_scaled"))
    if prediction != "raw":
        r.unmapped.append(f"model_prediction_type = {prediction!r}{'' if 'model_prediction_type' in given else ' (default)'} "
                          "(lorabuild trains the velocity as the model predicts it, kohya's raw)")
    if scheme in ("sigma_sqrt", "cosmap"):
        if prediction == "sigma_scaled":
            r.set("train.weighting_scheme", scheme, "weighting_scheme")
        else:
            r.unmapped.append(f"weighting_scheme = {scheme!r} (kohya weights the FLUX loss by it with "
                              "model_prediction_type sigma_scaled only)")


def _sd3(r, given: dict) -> None:
    scheme = str(given.get("weighting_scheme", "uniform"))
    source = "weighting_scheme" if "weighting_scheme" in given else "weighting_scheme's default (uniform)"
    r.set("train.timestep_sampling", _density(r, given, scheme, negate=False), source)
    r.set("train.discrete_flow_shift", _num(given, "training_shift", 1.0), "training_shift" if "training_shift" in given
          else "training_shift's default (1.0)")
    r.set("train.weighting_scheme", scheme if scheme in ("sigma_sqrt", "cosmap") else "none", source)
    used = {"weighting_scheme", "training_shift"} | ({"logit_mean", "logit_std"} if scheme == "logit_normal" else set()) \
        | ({"mode_scale"} if scheme == "mode" else set())
    _unused(r, given, [k for k in OBJECTIVE if k not in used], "for SD 3.5 (sd3_train_network.py)")


def network_arg(r, key: str, value: str) -> bool:
    """A FLUX/SD3 network_args option mapped or listed; False for one this does not know."""
    if key in NETWORK_ARGS:
        dotted, conv = NETWORK_ARGS[key]
        r.set(f"network.{dotted}", conv(value.strip()), f"network_args {key}")
    elif key == "train_t5xxl":
        if flag(value):
            r.set("network.train_t5xxl", True, "network_args train_t5xxl")
        else:
            r.off.append("network_args train_t5xxl")
    elif key == "split_qkv":
        r.set("network.split_qkv", flag(value), "network_args split_qkv")
    elif key in ("in_dims", "emb_dims"):  # kohya: "[4,0,0,0,4]" or "4,0,0,0,4", one rank per embedder
        dims = _dims(value)
        wrong = dims is None or embedder_problems({key: dims}, None)
        if wrong:
            why = wrong[0][1] if dims is not None else "not a list of whole numbers"
            r.unmapped.append(f"network_args {key}={value} ({why})")
        else:
            r.set(f"network.{key}", dims, f"network_args {key}")
    else:
        return False
    return True


def _dims(value: str) -> list[int] | None:
    """kohya's in_dims / emb_dims text as a list of ints (networks/lora_flux.py strips the brackets and
    splits on commas), or None."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        return None


def finish(r) -> None:
    """After every option: T5 trains with the text encoders only (kohya's network_train_unet_only wins)."""
    if r.get("network.train_t5xxl") and r.get("network.train_text_encoder", True) is False:
        r.doc["network"].pop("train_t5xxl")
        source = r.sources.pop("network.train_t5xxl")
        r.unmapped.append(f"{source}=True (the text encoders do not train here: network_train_unet_only)")
