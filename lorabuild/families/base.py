"""The interface every model family implements, with SD 1.x's answers as the defaults.

A family is a class with plain attributes (names, numbers: readable without torch) and a few
methods that import torch/diffusers/transformers when called. The registry in
``families/__init__.py`` holds one instance per family; :func:`lorabuild.families.family`
finds one by its name (the ``arch`` that ``models.model_info`` reports and ``model_type``
sets) and :func:`lorabuild.families.family_of` by a model folder's configs, a loaded
pipeline or a single file's keys.
"""
from __future__ import annotations

from pathlib import Path

from ..resources import DATA_DIR

CONFIGS_DIR = DATA_DIR / "configs"  # one folder per family: model_index.json and every component's config
TOKENIZER_DIR = DATA_DIR / "clip_tokenizer"

# SD1's noise schedule (CompVis v1-inference.yaml; diffusers' SD 1.5 scheduler config).
SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


class Family:
    """One model family: what differs between SD 1.x, SD 2.x and SDXL (and the models after them)."""

    name = ""  # the arch / model_type value: "sd1"
    title = ""  # in messages: "SD 1.x"
    # --- built-in models: name → method building its random tiny pipeline; shipped: pretrained weights
    tiny_models: dict[str, str] = {}
    shipped_models: tuple[str, ...] = ()
    # --- text conditioning
    text_parts: tuple[str, ...] = ("text_encoder",)  # the text encoders, in conditioning order
    pooled = False  # whether the denoiser also takes a pooled text embedding (cached as "pooled")
    clip_skip = True  # whether textemb.clip_skip applies
    # --- single files: a key prefix only this family's checkpoints carry, and its cross-attention width
    checkpoint_prefix = ""
    cross_attention_width = 0
    reads_checkpoint_markers = False  # the v_pred / ztsnr marker keys (models.checkpoint_markers)
    single_file = True  # whether a single-file checkpoint of the family converts (models._single_file)
    # a single file's text encoders as separate files (``text_encoders:``, lorabuild/separate.py): the
    # project's names in conditioning order (FLUX.1: clip_l, t5xxl); none: the file holds them all
    separate_encoders: tuple[str, ...] = ()
    denoiser_reader = "diffusers"  # who reads the denoiser from a file: diffusers, or "bfl" (flux_checkpoint.py)
    # --- kohya / ModelSpec metadata
    base_model_version = ""  # ss_base_model_version
    modelspec_arch = ""  # modelspec.architecture, before "/lora"
    modelspec_implementation = "diffusers"
    ss_v2 = False
    # --- the UNet as kohya's block-wise options see it (lora/blocks.py): (blocks, down/up lr-weight
    # entries, mid entries); whether kohya names its modules in the original SGM layout; bucket step
    block_layout = (25, 12, 1)
    sgm_names = False
    unet_title = "SD 1.x/2.x"  # in messages about the UNet's layout, which SD 1.x and 2.x share
    bucket_step = 64  # latents are 1/8 of the pixels and the UNet halves them 3 times
    native_size = 512  # the side the model was trained at: default sample size
    pipeline_class = "StableDiffusionPipeline"
    # --- the denoiser: its component folder and diffusers class (a UNet, or a flow model's transformer)
    denoiser_part = "unet"
    denoiser_class = "UNet2DConditionModel"
    # --- the objective's settings a flow family fills in where train leaves them null (flow.FlowSettings)
    flow_defaults: dict = {}
    # --- LoRA: the denoiser's container classes whose Linears are trained by default (kohya's
    # UNET_TARGET_REPLACE_MODULE; network.unet_target_modules at its default means these), ss_network_module
    unet_targets: tuple[str, ...] = ("Transformer2DModel",)
    network_module = "networks.lora"

    # --- detection ------------------------------------------------------------------------------
    def claims(self, parts: set[str], te_config: dict) -> bool:
        """Whether a model with these components and first text encoder config is this family
        (the registry asks the most specific family first; SD 1.x answers yes to any)."""
        return True

    def claims_checkpoint(self, keys) -> bool:
        return bool(self.checkpoint_prefix) and any(k.startswith(self.checkpoint_prefix) for k in keys)

    # --- configs and tokenizers -------------------------------------------------------------------
    @property
    def configs(self) -> Path:
        """The shipped diffusers configs a single file of this family is converted with."""
        return CONFIGS_DIR / self.name

    def checkpoint_configs(self, keys) -> Path:
        """The shipped configs a single file with these keys is converted with (SD 3.5: Large or Medium)."""
        return self.configs

    def tokenizer_source(self, which: str, text_config: dict | None = None) -> Path:
        """The shipped tokenizer files a single file's conversion copies into ``which`` (tokenizer, …),
        for the text encoder of config ``text_config``."""
        return TOKENIZER_DIR

    def pads_with_bang(self, tokenizer: str) -> bool:
        """Whether ``tokenizer`` (tokenizer, tokenizer_2) is OpenCLIP's, which pads with "!"."""
        return False

    def text_encoder_class(self, which: str) -> str:
        """The transformers class of text encoder ``which``."""
        return "CLIPTextModel"

    def tokenizer_class(self, which: str) -> str:
        """The transformers class of tokenizer ``which`` (tokenizer, tokenizer_2, …)."""
        return "CLIPTokenizer"

    # --- the training objective ------------------------------------------------------------------
    def objective(self, scheduler_config: dict) -> str:
        """What the denoiser predicts: "eps" or "v" (DDPM, from the scheduler's prediction type), or
        "flow" (rectified flow's velocity, lorabuild/flow.py). The trainer asks this (objective.make)."""
        return "v" if scheduler_config.get("prediction_type") == "v_prediction" else "eps"

    def predict(self, denoiser, noisy, t, hidden, added):
        """The denoiser's prediction for ``noisy`` latents ``[B, C, h, w]`` at ``t`` (DDPM steps, or
        σ for a flow family), in the latents' shape: one call for training and validation."""
        return denoiser(noisy, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def metadata_version(self, prediction_type: str) -> str:
        return self.base_model_version

    def modelspec_architecture(self, prediction_type: str) -> str:
        return self.modelspec_arch

    def sample_size(self, prediction_type: str) -> int:
        return self.native_size

    # --- building and loading ---------------------------------------------------------------------
    def build_tiny(self, name: str):
        """The randomly initialised pipeline of built-in model ``name`` (fixed seeds, CPU)."""
        return getattr(self, self.tiny_models[name])()

    def load_shipped(self, folder: Path):
        raise NotImplementedError(f"{self.title} ships no pretrained built-in model")

    def from_single_file(self, src: str, config: str, torch_dtype):
        """A pipeline converted from single file ``src`` with the diffusers configs in ``config``."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_single_file(
            src, config=config, local_files_only=True, torch_dtype=torch_dtype, **self._pipeline_extras())

    def from_pretrained(self, model_dir: Path):
        """The sampling pipeline saved in ``model_dir`` (its models as saved; the caller freezes them)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(
            str(model_dir), local_files_only=True, **self._pipeline_extras(load=True))

    def make_pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler):
        """A sampling pipeline around already loaded models (the training UNet, for one)."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class)(
            vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler,
            **self._pipeline_extras(make=True))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _pipeline_extras(self, load: bool = False, make: bool = False) -> dict:
        # SD 1.x/2.x pipelines come with a safety checker: lorabuild renders training samples, off
        if load:
            return {"safety_checker": None, "requires_safety_checker": False}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encoders_of(self, pipe) -> list:
        return [getattr(pipe, p) for p in self.text_parts if getattr(pipe, p, None) is not None]

    def tokenizers_of(self, pipe) -> list:
        return [getattr(pipe, p.replace("text_encoder", "tokenizer")) for p in self.text_parts
                if getattr(pipe, p, None) is not None]

    # --- text conditioning -----------------------------------------------------------------------
    def text_options(self, textemb: dict, model_dir) -> dict:
        """The family's own text-encoding settings from the ``textemb`` section, passed to
        :meth:`condition` as keywords and keyed where embeddings are (FLUX's T5 length and mask);
        none for the CLIP-only families, whose keys stay as they were."""
        return {}

    def condition(self, tokenizers: list, text_encoders: list, captions: list[str], clip_skip: int = 1,
                  max_token_length: int = 75, **options):
        """(hidden states, pooled or None) for ``captions``: what the denoiser is conditioned on.
        One function for the textemb cache, training and sampling, so they agree; ``options``:
        :meth:`text_options`."""
        from ..textenc import encode

        return encode(tokenizers[0], text_encoders[0], captions, clip_skip, max_token_length), None

    def frozen_text_parts(self, net: dict) -> tuple[int, ...]:
        """The text encoders (indices into ``text_parts``) that stay frozen while the others train
        (``network.train_text_encoder``): textemb caches their outputs even then, through
        ``encode_frozen``, and training passes them to :meth:`condition` as ``t5_hidden``, so it
        never loads them (kohya caches T5's outputs while CLIP-L trains). None here: CLIP alone."""
        return ()

    def added_inputs(self, pooled, time_ids: list) -> dict | None:
        """The denoiser's extra inputs beside the hidden states (on the CPU; the caller moves them)."""
        return None

    def prompt_arguments(self, pipe, hidden, pooled, negative: tuple | None) -> dict:
        """The pipeline's keyword arguments for a prompt's (and a negative's) embeddings."""
        out = {"prompt_embeds": hidden}
        if negative is not None:
            out["negative_prompt_embeds"] = negative[0]
        return out

    def guidance_arguments(self, settings: dict) -> dict:
        """The pipeline's guidance keywords for a sample's settings (``prompts.resolve``): CFG's scale."""
        return {"guidance_scale": settings["cfg"]}

    def encodes_empty_negative(self, pipe) -> bool:
        """Whether an empty negative prompt is encoded (SD 1/2) or left to the pipeline (SDXL: zeros)."""
        return True

    # --- LoRA naming -----------------------------------------------------------------------------
    def te_prefixes(self, n: int) -> list[str]:
        """kohya's text-encoder prefixes for ``n`` trained encoders: lora_te alone, lora_te1, lora_te2 … with several."""
        return ["lora_te"] if n == 1 else [f"lora_te{i}" for i in range(1, n + 1)]

    def saved_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        """The trained tensors (named by the denoiser's module paths) as the family's files name them."""
        return tensors

    def trained_layout(self, tensors: dict, denoiser_config: dict, wanted: set[str]) -> dict:
        """A file's tensors back in the names training uses (the inverse of :meth:`saved_layout`);
        ``wanted``: the network's module names (or {name: rank})."""
        return tensors

    def fused_parts(self, denoiser_config: dict) -> dict[str, str]:
        """{trained module name: the fused layer of the family's files it is a part of} (FLUX's qkv and
        linear1, SD 3.5's qkv): what ``network.split_qkv: false`` trains as one LoRA; none for SD."""
        return {}

    def file_modules(self, denoiser_config: dict) -> dict[str, tuple[str, int, int, bool]]:
        """{trained module name: (the family files' module name, part index, parts, halves swapped)} where
        the files' layout differs from the trained modules' (FLUX's and SD 3.5's fused layers): a LyCORIS
        type trains the files' layers (lora/lyco_fused.py); none for SD (its names are the files')."""
        return {}

    def model_metadata(self, denoiser_config: dict) -> dict:
        """Metadata the denoiser's own config decides (SD 3.5: Large or Medium); none for the others."""
        return {}

    peft_format = False  # whether output.format: diffusers writes this family's LoRA (peft_layout)

    def peft_layout(self, tensors: dict, denoiser_config: dict) -> dict:
        """The trained tensors in PEFT's names, as diffusers' ``load_lora_weights`` reads them."""
        raise NotImplementedError(f"{self.title}: no diffusers (PEFT) layout")

    def metadata_extra(self, cfg: dict) -> dict:
        """The family's own ``ss_*`` metadata from the project's sections (a flow model's objective)."""
        return {}

    def unet_rename(self, unet):
        """A map from a diffusers module path to the path kohya names it by, or None (the same)."""
        if not self.sgm_names:
            return None
        from ..lora.layout import to_original, unet_block_map

        block_map = unet_block_map(dict(unet.config))
        return lambda path: to_original(path, block_map)
