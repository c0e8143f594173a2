"""The train stage's run plan (lorabuild.train.plan: run_plan, decide, start_note) on real stores in
a temporary cache, without training: what a fresh run, a raised ``epochs``, a restore and a run
killed part way decide."""
from __future__ import annotations

from lorabuild.cache import Store, key_hash
from lorabuild.train.plan import Sample, Whole, decide, make_plan, run_plan, start_note

# 4 images × 2 repeats, batch 2: 4 steps per epoch
SAMPLES = [Sample(f"im{i}", (64, 64), 2) for i in range(4)]


def _key(scheduler: str = "constant", epochs: int = 2) -> dict:
    """A run key shaped like the train stage's (only what the run plan reads is real)."""
    train = {"lr_scheduler": scheduler, "epochs": epochs, "max_steps": None, "save_every_n_epochs": 1,
             "save_every_n_steps": None, "learning_rate": 1e-4}
    return {"stage": "train", "v": 2, "images": [[s.id, "h", "cap", 2] for s in SAMPLES],
            "params": {"train": train, "network": {"dim": 4}, "save_precision": "fp16", "bucket": {}}}


def _rp(epochs: int, scheduler: str = "constant", save_every: int | None = 1, points: dict | None = None):
    plan = make_plan(SAMPLES, 2, 1, epochs)
    return run_plan(_key(scheduler, epochs), plan, save_every, None, points or {}, with_ema=False)


def _stores(tmp_path):
    return Store(tmp_path, "train", ".safetensors"), Store(tmp_path, "train", ".pt")


def _put(store, h: str, data: bytes = b"weights", info: dict | None = None) -> None:
    with store.put(h, {"h": h}, info) as tmp:
        tmp.write_bytes(data)


def _train_epochs(rp, store, states, upto: int) -> None:
    """What training up to the end of epoch ``upto`` leaves: the saved epochs' files, their states and
    the latest state (the state of an epoch not saved is superseded by the next one, as in training)."""
    for e in range(1, upto + 1):
        if e in rp.saved:
            _put(store, rp.epoch_hash(e), info={"epoch": e, "step": rp.plan.epoch_end_step(e)})
        _put(states, rp.state_hash(e), b"state", {"epoch": e, "step": rp.plan.epoch_end_step(e)})
        if e - 1 >= 1 and e - 1 not in rp.saved:
            states.remove(rp.state_hash(e - 1))
    for row, (_, step) in rp.snapshot_points.items():
        if step <= rp.plan.epoch_end_step(upto):
            _put(store, rp.snap_hash(row))
            _put(states, rp.full_hash(row), b"full")


def _entry(start) -> dict:
    return {"epochs": start.epochs, "snapshots": start.snapshots, "loss": [], "val": []}


def test_a_fresh_run_trains_from_the_start(tmp_path):
    store, states = _stores(tmp_path)
    rp = _rp(3)
    assert rp.plan.steps_per_epoch == 4 and rp.saved == {1, 2, 3}
    start = decide(rp, None, store, states, Whole())
    assert (start.restore, start.epoch, start.epochs, start.snapshots) == (False, 0, [], [])
    assert start_note(rp, 0, None, "constant") is None  # nothing earlier could have been continued


def test_raised_epochs_continue_after_the_last_trained_epoch(tmp_path):
    store, states = _stores(tmp_path)
    short = _rp(2)
    _train_epochs(short, store, states, 2)
    longer = _rp(5)
    # a length-free schedule: the 5-epoch run's first two epochs are the 2-epoch run's
    assert longer.wkey == short.wkey and longer.epoch_hash(2) == short.epoch_hash(2)
    start = decide(longer, None, store, states, Whole())
    assert not start.restore and start.epoch == 2
    assert start.epochs == [[1, short.epoch_hash(1), 4], [2, short.epoch_hash(2), 8]]
    assert start_note(longer, 2, 8, "constant") == "continued from the training state after epoch 2 (step 8)"
    # back to 2 epochs: everything is there, so the run is assembled, not trained
    again = decide(short, None, store, states, Whole())
    assert again.epoch == 2 and start_note(short, 2, 8, "constant").startswith("assembled from epochs trained before")


def test_a_length_dependent_schedule_never_continues_a_shorter_run(tmp_path):
    store, states = _stores(tmp_path)
    short = _rp(2, "cosine")
    _train_epochs(short, store, states, 2)
    longer = _rp(5, "cosine")
    assert longer.wkey["total_steps"] == 20 and longer.epoch_hash(2) != short.epoch_hash(2)
    start = decide(longer, None, store, states, Whole())
    assert (start.epoch, start.epochs) == (0, [])
    assert start_note(longer, 0, None, "cosine") == ("trained from the start: the cosine schedule depends on the "
                                                     "run's length, so no earlier run can be continued")


def test_a_complete_entry_is_restored_and_a_damaged_file_is_made_again(tmp_path):
    store, states = _stores(tmp_path)
    points = {"s000006": ("step 6", 6)}  # a sample point inside epoch 2: a snapshot of its own
    rp = _rp(3, points=points)
    assert rp.snapshot_points == points
    _train_epochs(rp, store, states, 3)
    entry = _entry(decide(rp, None, store, states, Whole()))
    assert entry["snapshots"] == [["s000006", "step 6", 6, rp.snap_hash("s000006")]]
    assert decide(rp, entry, store, states, Whole()).restore
    # the snapshot's file damaged on disk: no restore; the run resumes after epoch 3 (its
    # full-precision weights are there to write the snapshot again from), and the damaged file is gone
    store.path(rp.snap_hash("s000006")).write_bytes(b"flipped")
    start = decide(rp, entry, store, states, Whole())
    assert (start.restore, start.epoch) == (False, 3)
    assert not store.has(rp.snap_hash("s000006"))


def test_a_killed_run_resumes_after_its_last_whole_state(tmp_path):
    store, states = _stores(tmp_path)
    rp = _rp(4, save_every=2)  # saves epochs 2 and 4; states after every epoch
    assert rp.saved == {2, 4}
    _train_epochs(rp, store, states, 3)  # killed during epoch 4
    start = decide(rp, None, store, states, Whole())
    assert start.epoch == 3 and start.epochs == [[2, rp.epoch_hash(2), 8]]
    # the state after epoch 3 damaged: back to epoch 2's, whose saved file is there
    states.path(rp.state_hash(3)).write_bytes(b"torn")
    start = decide(rp, None, store, states, Whole())
    assert start.epoch == 2
    # and without epoch 2's saved file (or a state to write it from) nothing can be continued
    store.remove(rp.epoch_hash(2))
    states.remove(rp.state_hash(2))
    assert decide(rp, None, store, states, Whole()).epoch == 0
    assert key_hash(rp.tkey) != key_hash(rp.wkey)  # states are keyed without the output settings
