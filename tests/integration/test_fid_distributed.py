"""Two real gloo processes evaluate FID/KID of the same 51 samples (uneven split 26 + 25) and
must match the single-process result; the real-feature cache and the too-few-images error
must behave the same on every rank (no rank left hanging in a collective). Precision/recall,
whose distance rows are split over the ranks, must equal the single-process counts exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distgan.metrics import EvalError, evaluate
from distgan.metrics.fid import latents, shard
from distgan.metrics.precision_recall import precision_recall

Z, N, CLASSES, WORLD = 16, 51, 3, 2


def toy_generator(num_classes: int = CLASSES):
    """Fixed per-sample deterministic 'generator' (no batch statistics)."""
    g = torch.Generator().manual_seed(0)
    w, emb = torch.randn(Z, 48, generator=g), torch.randn(num_classes, 48, generator=g)

    def generate(z, labels=None):
        x = z @ w + (emb[labels] if labels is not None else 0)
        return torch.tanh(F.interpolate(x.view(-1, 3, 4, 4), size=32, mode="bilinear"))

    return generate


def real_data() -> torch.Tensor:
    """Real images: the same distribution as the generator, other samples (FID clearly > 0)."""
    z, labels = latents(1, range(N), Z, CLASSES)
    return toy_generator()(z, labels)


def pr_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Real and fake feature sets that overlap partly (precision and recall strictly inside (0, 1))."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(70, 16, generator=g), torch.randn(61, 16, generator=g) * 0.7 + 0.4


def stream(images: torch.Tensor, pulled: list, size: int = 10):
    for i in range(0, len(images), size):
        pulled.append(1)
        yield images[i : i + size]


def _worker(rank: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        gen, data = toy_generator(), real_data()
        mine = data[shard(N, rank, WORLD)[0].start : shard(N, rank, WORLD)[0].stop]  # this rank's stream
        calls = []

        def counting(z, labels):
            calls.append(len(z))
            return gen(z, labels)

        kw = dict(extractor="tiny", batch_size=8, cache_dir=f"{tmp}/cache", real_id="toy", resolution=32,
                  rank=rank, world_size=WORLD)
        out = {"share": len(mine)}
        pulled: list = []
        out["first"] = evaluate(counting, Z, CLASSES, stream(mine, pulled), N, **kw)
        out["pulled_first"], pulled = len(pulled), []
        out["cached"] = evaluate(counting, Z, CLASSES, stream(mine, pulled), N, **kw)
        out["pulled_cached"], out["generated"] = len(pulled), sum(calls)
        # Rank 1's stream runs dry: every rank must raise, before generating anything.
        calls.clear()
        short = mine[:10] if rank == 1 else mine
        try:
            evaluate(counting, Z, CLASSES, stream(short, []), N, extractor="tiny", rank=rank, world_size=WORLD)
            out["short"] = "no error"
        except EvalError as e:
            out["short"] = f"EvalError: {e}"
        out["short_generated"] = sum(calls)
        # Blocks of 8 rows: 9 and 8 blocks dealt over the two ranks (rank 0 takes one more).
        out["pr_split"] = precision_recall(*pr_features(), rank=rank, world_size=WORLD, rows_per_block=8)
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fid_equals_one_process(tmp_path):
    gen, data = toy_generator(), real_data()
    single = evaluate(gen, Z, CLASSES, [data[i : i + 10] for i in range(0, N, 10)], N, extractor="tiny")
    assert single["fid"] > 1e-3 and single["n_real"] == single["n_fake"] == N

    split_single = precision_recall(*pr_features(), rows_per_block=8)
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert [r["share"] for r in ranks] == [26, 25]  # n split exactly, the last rank gets fewer
    for r in ranks:
        for key in ("first", "cached"):
            got = r[key]
            assert got["fid"] == pytest.approx(single["fid"], rel=1e-4)
            assert got["kid"] == pytest.approx(single["kid"], rel=1e-4, abs=1e-7)
            assert {k: got[k] for k in ("n_real", "n_fake", "resize", "extractor")} == {
                "n_real": N, "n_fake": N, "resize": "none", "extractor": "tiny"}
            assert got["swd"] == pytest.approx(single["swd"], rel=1e-5)  # from the gathered pixels, any world size
        # Second call: Inception features from the cache on all ranks; the real stream is still read
        # (decoding only) because SWD needs the pixels, which the cache does not hold.
        assert r["pulled_first"] == 3 and r["pulled_cached"] == 3
        assert r["generated"] == 2 * r["share"]
        assert r["short"].startswith("EvalError: too few real images") and r["short_generated"] == 0
        for key in ("first", "cached"):
            assert (r[key]["precision"], r[key]["recall"]) == (single["precision"], single["recall"])
        assert tuple(r["pr_split"]) == split_single == precision_recall(*pr_features())
    assert 0 < split_single[0] < 1 and 0 < split_single[1] < 1
    assert len(list((tmp_path / "cache").glob("real-tiny-*.safetensors"))) == 1
