"""Checkpoints: atomic files, exact resumption, and states saved on a stop.

Every run here uses ``chunk_size=5`` and step counts that are multiples of 5,
so each PMA object compiles one executable and the file stays fast.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from flax import serialization

from numpyro_pma import PMA, AutoBrenier, PMAFailure, checkpoint, driver
from numpyro_pma.checkpoint import load_checkpoint, save_checkpoint
from numpyro_pma.driver import aligned_chunk_size, chunk_bounds
from numpyro_pma.mirror import MirrorInfo

DATA = jnp.array([[0.5, -1.0], [1.5, 0.0], [1.0, -0.5]])
NUM_STEPS = 20
CHUNK = 5


def gaussian_model(y):
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def holes_model(threshold, frequency):
    # N(0, I) on R^2 whose log density is NaN beyond x[0] = threshold and on the
    # stripes sin(frequency * x[0]) > 0.9, which hold 14% of any interval
    # longer than a few periods.
    x = numpyro.sample("x", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    holes = (x[0] > threshold) | (jnp.sin(frequency * x[0]) > 0.9)
    numpyro.factor("holes", jnp.where(holes, jnp.nan, 0.0))


def make_pma(model=gaussian_model, **options):
    guide = AutoBrenier(model, hidden_sizes=(4,))
    defaults = dict(num_particles=32, num_whitening_steps=0)
    defaults.update(options)
    return PMA(model, guide, step_size=0.5, **defaults)


def assert_trees_equal(first, second):
    first_leaves = jax.tree.leaves(first)
    second_leaves = jax.tree.leaves(second)
    assert len(first_leaves) == len(second_leaves)
    for a, b in zip(first_leaves, second_leaves, strict=True):
        if jnp.issubdtype(jnp.result_type(a), jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def reference_pma():
    return make_pma()


@pytest.fixture(scope="module")
def resuming_pma():
    # A second guide and PMA object, as a new process would build them.
    return make_pma()


@pytest.fixture(scope="module")
def uninterrupted(reference_pma, tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted") / "run.ckpt"
    result = reference_pma.run(
        jax.random.key(0),
        NUM_STEPS,
        DATA,
        progress_bar=False,
        chunk_size=CHUNK,
        checkpoint_path=path,
        checkpoint_every=10,
    )
    return result, path


def test_final_checkpoint_matches_final_state(reference_pma, uninterrupted):
    result, path = uninterrupted
    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    checkpoint = load_checkpoint(path, template)
    assert_trees_equal(checkpoint.mirror_state, result.state.mirror_state)
    assert_trees_equal(checkpoint.rng_key, result.state.rng_key)
    assert_trees_equal(checkpoint.trace, result.trace)
    assert len(checkpoint.trace.elbo) == NUM_STEPS


def test_resume_matches_uninterrupted_run(
    reference_pma, resuming_pma, uninterrupted, tmp_path
):
    expected, _ = uninterrupted
    path = tmp_path / "half.ckpt"
    half = reference_pma.run(
        jax.random.key(0),
        NUM_STEPS // 2,
        DATA,
        progress_bar=False,
        chunk_size=CHUNK,
        checkpoint_path=path,
    )
    assert int(half.state.mirror_state.step) == NUM_STEPS // 2

    resumed = resuming_pma.resume(
        path, NUM_STEPS, DATA, progress_bar=False, chunk_size=CHUNK
    )
    # Bitwise: the same executables on the same inputs (CPU is deterministic).
    assert_trees_equal(resumed.trace, expected.trace)
    assert_trees_equal(resumed.params, expected.params)
    assert_trees_equal(resumed.state, expected.state)
    # The resumed run rewrote the checkpoint with the whole run.
    template = resuming_pma.init(jax.random.key(1), DATA).mirror_state
    assert len(load_checkpoint(path, template).trace.elbo) == NUM_STEPS


class InterruptingBar:
    """A stand-in for tqdm that raises KeyboardInterrupt on its third update."""

    def __init__(self, *args, **kwargs):
        self.updates = 0

    def update(self, count):
        self.updates += 1
        if self.updates == 3:
            raise KeyboardInterrupt

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def test_interrupted_run_saves_and_resumes_exactly(
    reference_pma, resuming_pma, uninterrupted, tmp_path, monkeypatch
):
    expected, _ = uninterrupted
    path = tmp_path / "interrupted.ckpt"
    monkeypatch.setattr(driver, "tqdm", InterruptingBar)
    with pytest.warns(UserWarning, match="Interrupted: returning the 15 completed"):
        partial = reference_pma.run(
            jax.random.key(0),
            NUM_STEPS,
            DATA,
            chunk_size=CHUNK,
            checkpoint_path=path,
            checkpoint_every=10,
        )
    monkeypatch.undo()
    assert len(partial.trace.elbo) == 3 * CHUNK

    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    saved = load_checkpoint(path, template)
    assert int(saved.mirror_state.step) == 3 * CHUNK
    assert_trees_equal(saved.trace, partial.trace)

    # Repeating the interrupted call with resume_from finishes it.
    resumed = resuming_pma.run(
        None,
        NUM_STEPS,
        DATA,
        progress_bar=False,
        chunk_size=CHUNK,
        checkpoint_path=path,
        checkpoint_every=10,
        resume_from=path,
    )
    assert_trees_equal(resumed.trace, expected.trace)
    assert_trees_equal(resumed.state, expected.state)


def test_resume_at_num_steps_takes_no_step(resuming_pma, uninterrupted):
    expected, path = uninterrupted
    again = resuming_pma.run(
        None, NUM_STEPS, DATA, progress_bar=False, resume_from=path
    )
    assert_trees_equal(again.state, expected.state)
    assert again.timing.compile_time == 0.0


def test_interrupted_write_keeps_previous_checkpoint(
    uninterrupted, reference_pma, tmp_path, monkeypatch
):
    result, _ = uninterrupted
    path = tmp_path / "run.ckpt"
    state = result.state
    save_checkpoint(path, state.mirror_state, state.rng_key, result.trace)
    before = path.read_bytes()

    def interrupt(descriptor):
        raise KeyboardInterrupt

    # The interruption comes after the new bytes were written to the temporary
    # file but before it replaced the checkpoint.
    monkeypatch.setattr(os, "fsync", interrupt)
    shorter = jax.tree.map(lambda values: values[:3], result.trace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, state.mirror_state, state.rng_key, shorter)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]
    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    assert len(load_checkpoint(path, template).trace.elbo) == NUM_STEPS


def test_truncated_checkpoint_is_rejected(uninterrupted, reference_pma, tmp_path):
    _, path = uninterrupted
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:100])
    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(truncated, template)


def test_checkpoint_of_other_model_is_rejected(uninterrupted):
    _, path = uninterrupted

    def wider_model(y):
        mu = numpyro.sample("mu", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)

    pma = make_pma(wider_model)
    with pytest.raises(ValueError, match="does not match this model"):
        pma.resume(path, NUM_STEPS, jnp.ones((4, 3)), progress_bar=False)


def test_raw_uint32_key_round_trips(uninterrupted, reference_pma, tmp_path):
    result, _ = uninterrupted
    path = tmp_path / "raw.ckpt"
    raw_key = jax.random.PRNGKey(3)
    save_checkpoint(path, result.state.mirror_state, raw_key, result.trace)
    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    restored = load_checkpoint(path, template).rng_key
    assert restored.dtype == jnp.uint32
    np.testing.assert_array_equal(restored, raw_key)


def test_checkpoint_without_logdet_stderr_loads(uninterrupted, reference_pma, tmp_path):
    # Files written before MirrorInfo had logdet_stderr used the exact log
    # determinant, so the field comes back as zeros.
    result, _ = uninterrupted
    path = tmp_path / "older.ckpt"
    contents = {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "version": checkpoint._FORMAT_VERSION,
        "mirror_state": serialization.to_state_dict(
            jax.device_get(result.state.mirror_state)
        ),
        "rng_key_data": np.asarray(jax.random.key_data(result.state.rng_key)),
        "rng_key_impl": str(jax.random.key_impl(result.state.rng_key)),
        "trace": {
            field: np.asarray(value)
            for field, value in result.trace._asdict().items()
            if field != "logdet_stderr"
        },
    }
    path.write_bytes(serialization.msgpack_serialize(contents))
    template = reference_pma.init(jax.random.key(1), DATA).mirror_state
    restored = load_checkpoint(path, template)
    np.testing.assert_array_equal(restored.trace.elbo, result.trace.elbo)
    np.testing.assert_array_equal(
        restored.trace.logdet_stderr, np.zeros(NUM_STEPS, result.trace.elbo.dtype)
    )


@pytest.fixture(scope="module")
def holes_pma():
    return make_pma(holes_model, max_consecutive_rejections=5)


def test_failure_saves_state_and_keeps_good_params(holes_pma, tmp_path):
    # Stripes of period 2 pi / 50 = 0.13 everywhere: a batch of 32 draws misses
    # them all with probability 0.86^32 = 0.008, so the steps keep failing.
    path = tmp_path / "failed.ckpt"
    model_args = (jnp.array(jnp.inf), jnp.array(50.0))
    with pytest.raises(PMAFailure, match="in a row were rejected") as caught:
        holes_pma.run(
            jax.random.key(0),
            NUM_STEPS,
            *model_args,
            progress_bar=False,
            chunk_size=CHUNK,
            checkpoint_path=path,
        )
    error = caught.value
    mirror_state = error.state.mirror_state
    trace = error.trace
    assert len(trace.elbo) == int(mirror_state.step)
    assert int(mirror_state.consecutive_rejections) >= 5
    assert not trace.accepted[-5:].any()
    assert trace.num_nonfinite.sum() > 0
    # Nothing non-finite is averaged into an accepted step.
    assert np.all(np.isfinite(trace.elbo) | ~trace.accepted)
    assert np.all((trace.num_nonfinite == 0) | ~trace.accepted)
    # A rejected step returns to the last good parameters.
    for leaf in jax.tree.leaves(mirror_state.accepted_params):
        assert np.all(np.isfinite(leaf))
    assert_trees_equal(mirror_state.params, mirror_state.accepted_params)

    template = holes_pma.init(jax.random.key(1), *model_args).mirror_state
    saved = load_checkpoint(path, template)
    assert_trees_equal(saved.mirror_state, mirror_state)
    assert_trees_equal(saved.trace, trace)


def test_rare_nonfinite_draws_are_rejected_not_averaged(holes_pma):
    # NaN only beyond x[0] = 2.5, which the guide reaches once it has widened
    # towards N(0, I); the few steps that draw there are rejected.
    model_args = (jnp.array(2.5), jnp.array(0.0))
    result = holes_pma.run(
        jax.random.key(0), 40, *model_args, progress_bar=False, chunk_size=CHUNK
    )
    trace = result.trace
    hit = trace.num_nonfinite > 0
    assert hit.any()
    assert not trace.accepted[hit].any()
    assert trace.accepted.mean() > 0.8
    assert np.all(np.isfinite(trace.elbo[trace.accepted]))
    for leaf in jax.tree.leaves(result.params):
        assert np.all(np.isfinite(leaf))


class CountingState(NamedTuple):
    step: int
    consecutive_rejections: int


def counting_chunk_fn(reject_from=None, interrupt_on_call=None):
    """A chunk function without JAX: steps from ``reject_from`` on are rejected."""
    calls = []

    def chunk_fn(state, indices):
        calls.append(len(indices))
        if len(calls) == interrupt_on_call:
            raise KeyboardInterrupt
        indices = np.asarray(indices)
        accepted = np.ones(len(indices), bool)
        if reject_from is not None:
            accepted = indices < reject_from
        rejections = state.consecutive_rejections
        for step_accepted in accepted:
            rejections = 0 if step_accepted else rejections + 1
        zeros = [np.zeros(len(indices)) for _ in MirrorInfo._fields]
        info = MirrorInfo(*zeros)._replace(accepted=accepted)
        return CountingState(state.step + len(indices), rejections), info

    return chunk_fn


def recording_checkpoint_fn(saved):
    def checkpoint_fn(state, trace):
        saved.append((state.step, len(trace.accepted)))

    return checkpoint_fn


def test_checkpoints_every_interval_and_at_end():
    saved = []
    outcome = driver.run_chunks(
        counting_chunk_fn(),
        CountingState(0, 0),
        25,
        chunk_size=5,
        progress_bar=False,
        checkpoint_fn=recording_checkpoint_fn(saved),
        checkpoint_every=10,
    )
    assert saved == [(10, 10), (20, 20), (25, 25)]
    assert len(outcome.trace.accepted) == 25


def test_failure_checkpoints_before_raising():
    saved = []
    with pytest.raises(PMAFailure) as caught:
        driver.run_chunks(
            counting_chunk_fn(reject_from=12),
            CountingState(0, 0),
            40,
            chunk_size=5,
            progress_bar=False,
            max_consecutive_rejections=5,
            checkpoint_fn=recording_checkpoint_fn(saved),
        )
    # Steps 12-19 are rejected: 8 in a row by the end of the chunk [15, 20).
    assert saved == [(20, 20)]
    assert caught.value.state.step == 20
    assert len(caught.value.trace.accepted) == 20


def test_interrupt_checkpoints_last_completed_chunk():
    saved = []
    with pytest.warns(UserWarning, match="10 completed steps \\(checkpoint written"):
        outcome = driver.run_chunks(
            counting_chunk_fn(interrupt_on_call=3),
            CountingState(0, 0),
            40,
            chunk_size=5,
            progress_bar=False,
            checkpoint_fn=recording_checkpoint_fn(saved),
        )
    assert saved == [(10, 10)]
    assert outcome.state.step == 10
    assert len(outcome.trace.accepted) == 10


def test_resumed_trace_continues_initial_trace():
    saved = []
    zeros = [np.zeros(10) for _ in MirrorInfo._fields]
    initial = MirrorInfo(*zeros)._replace(accepted=np.ones(10, bool))
    outcome = driver.run_chunks(
        counting_chunk_fn(),
        CountingState(10, 0),
        10,
        chunk_size=5,
        progress_bar=False,
        initial_trace=initial,
        checkpoint_fn=recording_checkpoint_fn(saved),
    )
    assert saved == [(20, 20)]
    assert len(outcome.trace.accepted) == 20


def test_checkpoint_interval_must_be_chunk_multiple():
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        driver.run_chunks(
            counting_chunk_fn(),
            CountingState(0, 0),
            10,
            chunk_size=4,
            progress_bar=False,
            checkpoint_every=10,
        )


@pytest.mark.parametrize(
    "first, num_steps, chunk_size, expected",
    [
        (0, 12, 5, [(0, 5), (5, 10), (10, 12)]),
        (3, 10, 5, [(3, 5), (5, 10), (10, 13)]),
        (10, 10, 5, [(10, 15), (15, 20)]),
        (0, 0, 5, []),
    ],
)
def test_chunks_end_at_global_multiples(first, num_steps, chunk_size, expected):
    assert chunk_bounds(first, num_steps, chunk_size) == expected


@pytest.mark.parametrize(
    "chunk_size, checkpoint_every, expected",
    [(100, None, 100), (100, 30, 30), (100, 250, 50), (5, 10, 5), (100, 101, 1)],
)
def test_chunk_size_divides_checkpoint_interval(chunk_size, checkpoint_every, expected):
    assert aligned_chunk_size(chunk_size, checkpoint_every) == expected


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(checkpoint_every=10), ValueError, "needs a checkpoint_path"),
        (
            dict(checkpoint_path="x.ckpt", checkpoint_every=2.5),
            TypeError,
            "checkpoint_every",
        ),
        (dict(checkpoint_path="/no/such/folder/x.ckpt"), ValueError, "does not exist"),
        (dict(checkpoint_path=3), TypeError, "checkpoint_path"),
        (dict(resume_from="/no/such/file.ckpt"), ValueError, "does not exist"),
    ],
)
def test_invalid_checkpoint_options_raise(reference_pma, options, error, message):
    with pytest.raises(error, match=message):
        reference_pma.run(jax.random.key(0), 10, DATA, progress_bar=False, **options)


def test_resume_needs_existing_file(reference_pma, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from"):
        reference_pma.resume(tmp_path / "missing.ckpt", 10, DATA, progress_bar=False)


def test_resume_rejects_init_state_and_fewer_steps(
    reference_pma, uninterrupted, tmp_path
):
    result, path = uninterrupted
    with pytest.raises(ValueError, match="either init_state or resume_from"):
        reference_pma.run(None, 10, DATA, init_state=result.state, resume_from=path)
    with pytest.raises(ValueError, match="already contains 20 steps"):
        reference_pma.resume(path, 10, DATA, progress_bar=False)
