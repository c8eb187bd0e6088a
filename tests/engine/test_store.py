"""The embedding store (engine/store.py): real zarr stores in tmp_path, a tiny random model."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam.engine.cache import image_key
from napari_sam.engine.predictor import Predictor
from napari_sam.engine.store import (
    EmbeddingStore,
    embed_to_store,
    find_store,
    iter_embed,
    iter_planes,
    store_path_for,
)
from napari_sam.errors import CancelledError, InvalidInputError, StoreMismatchError

LIMITS = (0.0, 4000.0)


def _stack(n: int = 3, shape: tuple[int, int] = (100, 90), seed: int = 0) -> np.ndarray:
    """(n, H, W) uint16 planes with a few bright discs on noise."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 800, size=(n, *shape), dtype=np.uint16)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for z in range(n):
        for _ in range(3):
            r, c = rng.integers(15, min(shape) - 15, size=2)
            data[z][(rr - r) ** 2 + (cc - c) ** 2 < 120] = rng.integers(2000, 4000)
    return data


class _Counting:
    """Wraps a predictor's ``compute_embedding`` to count calls and keep weak
    references to every embedding it returned."""

    def __init__(self, predictor: Predictor) -> None:
        self.calls = 0
        self.refs: list[weakref.ref] = []
        self.most_alive = 0
        original = predictor.compute_embedding

        def compute(rgb):
            alive = sum(r() is not None for r in self.refs)
            self.most_alive = max(self.most_alive, alive)
            self.calls += 1
            out = original(rgb)
            self.refs.append(weakref.ref(out))
            return out

        predictor.compute_embedding = compute


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def test_store_embeddings_equal_fresh_ones_and_give_identical_masks(tiny_sam, tmp_path):
    data = _stack()
    path = tmp_path / "stack.tif.sam.zarr"
    result = embed_to_store(Predictor(tiny_sam), data, path, contrast_limits=LIMITS,
                            tile_size=48)
    store = EmbeddingStore.open(path)
    planes_and_tiles = len(store) // 3
    assert result.status == "created" and result.computed == len(store) == 3 * planes_and_tiles
    assert planes_and_tiles > 1  # 100 x 90 planes in 48 px tiles: tiles were embedded too
    assert store.complete and store.stack_shape == (3,)

    fresh = Predictor(tiny_sam)
    from_store = Predictor(tiny_sam, store=store)
    counter = _Counting(from_store)
    for z in range(3):
        fresh.set_image(data[z], contrast_limits=LIMITS)
        from_store.set_image(data[z], contrast_limits=LIMITS)
        assert torch.equal(from_store.features, fresh.features)
        assert from_store.input_size == fresh.input_size
        assert from_store.original_size == fresh.original_size == (100, 90)
        a = fresh.predict(points=[[50, 45], [20, 70]], labels=[1, 0])
        b = from_store.predict(points=[[50, 45], [20, 70]], labels=[1, 0])
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert counter.calls == 0 and store.hits == 3  # the encoder never ran
    # a tile's entry serves exactly that tile's pixels (as tiled everything-mode cuts them)
    from napari_sam.engine.image import to_rgb_uint8

    _plane, r0, c0, r1, c1, _h, _w = store.geometry[1]
    tile = np.ascontiguousarray(to_rgb_uint8(data[0], contrast_limits=LIMITS)[r0:r1, c0:c1])
    assert torch.equal(from_store.embed(tile).features, fresh.compute_embedding(tile))
    assert counter.calls == 0
    # whole planes one at a time, in stack order
    assert [index for index, _ in iter_planes(store)] == [(0,), (1,), (2,)]


def test_rerun_is_a_no_op(tiny_sam, tmp_path):
    data = _stack(2)
    path = tmp_path / "s.zarr"
    embed_to_store(Predictor(tiny_sam), data, path, contrast_limits=LIMITS)
    before = _files(path)
    predictor = Predictor(tiny_sam)
    counter = _Counting(predictor)
    steps = list(iter_embed(predictor, data, path, contrast_limits=LIMITS))
    result = embed_to_store(predictor, data, path, contrast_limits=LIMITS)
    assert steps == [] and result.status == "up to date" and result.computed == 0
    assert counter.calls == 0
    assert _files(path) == before  # nothing written, no file touched


def test_store_of_another_model_image_normalisation_or_tiling_is_refused(
        tiny_sam, tiny_sam_config, tmp_path):
    from reference_utils import build_random_sam

    data = _stack(2)
    path = tmp_path / "s.zarr"
    embed_to_store(Predictor(tiny_sam), data, path, contrast_limits=LIMITS, model_name="tiny")
    before = _files(path)
    other_model = Predictor(build_random_sam(tiny_sam_config, seed=1))
    cases = [
        (other_model, data, {}, "model: the store holds 'tiny'"),
        (Predictor(tiny_sam), data + 1, {}, "image: same shape (2, 100, 90) but other pixels"),
        (Predictor(tiny_sam), data[:1], {}, "image: the store holds an image of shape "
                                            "(2, 100, 90), this one has shape (1, 100, 90)"),
        (Predictor(tiny_sam), data, {"contrast_limits": (0, 1000)}, "normalisation: store "
                                                                     "contrast_limits=[0.0, "),
        (Predictor(tiny_sam), data, {"tile_size": 32}, "tiling: store overlap=None, "
                                                       "tile_size='auto', asked overlap=None, "
                                                       "tile_size=32"),
    ]
    for predictor, image, kwargs, expected in cases:
        kwargs = {"contrast_limits": LIMITS, **kwargs}
        with pytest.raises(StoreMismatchError) as err:
            embed_to_store(predictor, image, path, **kwargs)
        message = str(err.value)
        assert expected in message and "--overwrite" in message and "\n" not in message
        assert message.count(":") >= 2
        assert _files(path) == before  # refused: nothing touched
    # a Predictor refuses a store of other weights too
    with pytest.raises(StoreMismatchError, match="was made for model 'tiny'"):
        Predictor(other_model.model, store=EmbeddingStore.open(path))
    # overwrite replaces it with the other model's embeddings
    result = embed_to_store(other_model, data, path, contrast_limits=LIMITS, overwrite=True)
    assert result.status == "created" and result.computed == 2
    store = EmbeddingStore.open(path)
    assert torch.equal(store.plane((1,)).features,
                       other_model.compute_embedding(_rgb(data[1])))


def _rgb(plane: np.ndarray) -> np.ndarray:
    from napari_sam.engine.image import to_rgb_uint8

    return to_rgb_uint8(plane, contrast_limits=LIMITS)


def test_other_contrast_limits_never_use_the_store(tiny_sam, tmp_path):
    data = _stack(1)
    path = tmp_path / "s.zarr"
    embed_to_store(Predictor(tiny_sam), data, path, contrast_limits=LIMITS)
    predictor = Predictor(tiny_sam, store=EmbeddingStore.open(path))
    counter = _Counting(predictor)
    predictor.set_image(data[0], contrast_limits=(0, 1000))  # other pixels after normalising
    assert counter.calls == 1 and predictor.store.hits == 0
    fresh = Predictor(tiny_sam)
    fresh.set_image(data[0], contrast_limits=(0, 1000))
    assert torch.equal(predictor.features, fresh.features)


def test_a_folder_that_is_not_a_store_is_never_replaced(tiny_sam, tmp_path):
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InvalidInputError, match="is not a napari-sam embedding store"):
            embed_to_store(Predictor(tiny_sam), _stack(1), folder, overwrite=overwrite)
    assert (folder / "notes.txt").read_text() == "mine"
    with pytest.raises(InvalidInputError, match="is not a napari-sam embedding store"):
        EmbeddingStore.open(folder)


def test_cancel_keeps_finished_planes_and_the_next_run_resumes(tiny_sam, tmp_path):
    data = _stack(5)
    path = tmp_path / "s.zarr"
    predictor = Predictor(tiny_sam)
    seen = []
    steps = iter_embed(predictor, data, path, contrast_limits=LIMITS,
                       cancel=lambda: len(seen) == 2)
    with pytest.raises(CancelledError, match="after 2 of 5 entries"):
        for step in steps:
            seen.append(step)
    store = EmbeddingStore.open(path)
    assert store.done().tolist() == [True, True, False, False, False]
    with pytest.raises(InvalidInputError, match="was never computed"):
        store.plane((3,))
    reader = EmbeddingStore.open(path)  # opened while the store is unfinished
    assert reader.lookup(image_key(_rgb(data[3]))) is None
    counter = _Counting(predictor)
    result = embed_to_store(predictor, data, path, contrast_limits=LIMITS)
    assert result.status == "resumed" and result.computed == 3 and counter.calls == 3
    found = reader.lookup(image_key(_rgb(data[3])))  # sees what was written since
    assert found is not None
    assert torch.equal(found.features, predictor.compute_embedding(_rgb(data[3])))
    store = EmbeddingStore.open(path)
    assert store.complete
    for z in range(5):
        assert torch.equal(store.plane((z,)).features, predictor.compute_embedding(_rgb(data[z])))


def test_memory_stays_bounded_one_embedding_at_a_time(tiny_sam, tmp_path):
    """Neither writing nor reading a stack ever holds more than one plane's embedding:
    every embedding the encoder returned is freed before the next one is computed."""
    import tracemalloc

    predictor = Predictor(tiny_sam)
    embed_to_store(predictor, _stack(1), tmp_path / "warm.zarr")  # imports, zarr set-up
    counter = _Counting(predictor)
    peaks = {}
    for n in (10, 40):
        data = _stack(n, shape=(64, 64))
        tracemalloc.start()
        try:
            embed_to_store(predictor, data, tmp_path / f"s{n}.zarr", contrast_limits=LIMITS)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert counter.calls == 50
    assert counter.most_alive == 0  # the previous embedding was gone before each new one
    one = 64 * 8 * 8 * 4  # bytes of one tiny embedding (C = 64, E = 8, float32)
    # 30 more planes (480 KiB of embeddings) cost next to nothing at the peak
    assert peaks[40] - peaks[10] < 10 * one, peaks

    store = EmbeddingStore.open(tmp_path / "s40.zarr")
    refs = []
    for index, entry in iter_planes(store):
        gc.collect()
        assert sum(r() is not None for r in refs) == 0, index
        refs.append(weakref.ref(entry.features))
        del entry
    # a predictor reading the stack plane by plane keeps only the plane it shows
    reader = Predictor(tiny_sam, store=store)
    refs = []
    for z in range(n):
        reader.set_image(data[z], contrast_limits=LIMITS)
        gc.collect()
        assert sum(r() is not None for r in refs) == 0, z  # only the current plane lives
        refs.append(weakref.ref(reader.features))
    assert store.hits == n and len(reader.cache) == 0


def test_store_beside_the_image(tiny_sam, tmp_path):
    image = tmp_path / "cells.tif"
    assert store_path_for(image) == tmp_path / "cells.tif.sam.zarr"
    assert find_store(image) is None
    embed_to_store(Predictor(tiny_sam), _stack(1), store_path_for(image))
    store = find_store(image)
    assert isinstance(store, EmbeddingStore) and store.complete
    assert os.fspath(store.path) == os.fspath(tmp_path / "cells.tif.sam.zarr")


def test_bad_arguments_are_typed_errors(tiny_sam, tmp_path):
    predictor = Predictor(tiny_sam)
    for kwargs, match in (({"tile_size": 8}, "tile_size must be"),
                          ({"tile_size": 64, "overlap": 64}, "must be smaller"),
                          ({"overlap": -1}, "overlap must be")):
        with pytest.raises(InvalidInputError, match=match):
            embed_to_store(predictor, _stack(1), tmp_path / "s.zarr", **kwargs)
    with pytest.raises(InvalidInputError, match="image must be"):
        embed_to_store(predictor, np.zeros(5), tmp_path / "s.zarr")
    with pytest.raises(InvalidInputError, match="looks like one RGB"):
        embed_to_store(predictor, np.zeros((40, 50, 3), np.uint8), tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_precompute_all_planes_in_a_worker_with_progress_and_cancel(tiny_sam, tmp_path):
    """The widget's "precompute all planes" logic, Qt-free: a worker thread consumes the
    generator, the user cancels, the next run resumes, then the predictor reads the store
    for every plane the user visits (as the widget embeds them: plane + contrast limits)."""
    import threading

    from napari_sam.engine.image import to_rgb_uint8
    from napari_sam.engine.store import iter_precompute

    data = _stack(6)
    path = tmp_path / "layer.sam.zarr"
    predictor = Predictor(tiny_sam)
    cancelled = threading.Event()
    progress: list[tuple[int, int]] = []
    outcome: dict = {}

    def worker() -> None:
        steps = iter_precompute(predictor, data, path, contrast_limits=LIMITS,
                                cancel=cancelled.is_set)
        try:
            for step in steps:
                progress.append((step.done, step.total))
                if step.done == 3:
                    cancelled.set()  # the user presses Cancel
        except CancelledError as err:
            outcome["error"] = err

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(120)
    assert progress == [(1, 6), (2, 6), (3, 6)]
    assert isinstance(outcome["error"], CancelledError) and predictor.store is None
    assert EmbeddingStore.open(path).done().sum() == 3

    cancelled.clear()
    progress.clear()
    outcome.clear()
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(120)
    assert progress == [(4, 6), (5, 6), (6, 6)] and outcome == {}
    assert predictor.store is not None and predictor.store.complete
    counter = _Counting(predictor)
    for z in range(6):
        entry = predictor.embed(to_rgb_uint8(data[z], LIMITS))  # what the widget's worker does
        assert entry.original_size == (100, 90)
    assert counter.calls == 0 and predictor.store.hits == 6


def test_weights_hash_follows_the_weights(tiny_sam, tiny_sam_config):
    from napari_sam.engine.store import weights_hash
    from reference_utils import build_random_sam

    first = weights_hash(tiny_sam)
    assert weights_hash(tiny_sam) == first  # remembered
    assert weights_hash(build_random_sam(tiny_sam_config, seed=0)) == first  # same values
    assert weights_hash(build_random_sam(tiny_sam_config, seed=1)) != first
    with torch.no_grad():  # edited in place (as training does): a new hash
        next(tiny_sam.parameters()).add_(1e-3)
    changed = weights_hash(tiny_sam)
    assert changed != first
    with torch.no_grad():
        next(tiny_sam.parameters()).sub_(1e-3)
    assert weights_hash(tiny_sam) != changed
