"""Ranker training and re-ranking: loss goes down, bit-exact resume, the train/rerank CLI."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torchvision.ops import box_iou

from pipeline.errors import ConfrankError
from pipeline.ranker.model import RankerConfig, build_ranker
from pipeline.ranker.train import Trainer, TrainConfig, lr_at
from pipeline.provenance import provenance
from pipeline.tables import read_table, read_tables, shard_paths, write_table
from stages import rerank as rerank_stage
from stages import rankerio
from stages import train as train_stage
from stages.layout import Layout


pytestmark = pytest.mark.usefixtures("one_torch_thread")


N = 64


def make_dataset(root, layout: Layout, name="toy", n_images=6, detectors=("detA", "detB"), n_boxes=40):
    """A dataset of small noise images with square faces, its images table, and oracle
    shards (two shards per detector) with realistic box clusters around each face."""
    rng = np.random.default_rng(0)
    rows, dets = [], []
    (root / "images").mkdir(parents=True)
    for i in range(n_images):
        w, h = 128, 96
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        faces = np.array([[10 + 5 * i, 10, 40 + 5 * i, 45], [70, 40, 100, 80]], np.float32)
        for f in faces.astype(int):
            image[f[1]:f[3], f[0]:f[2]] = (60, 140, 220)
        image_id = f"0--Toy/img_{i}"
        path = root / "images" / f"img_{i}.png"
        cv2.imwrite(str(path), image)
        rows.append({"image_id": image_id, "path": f"images/img_{i}.png", "width": w, "height": h,
                     "split": "val", "event": "0--Toy"})
        for d, det in enumerate(detectors):
            centre = faces[rng.integers(0, 2, n_boxes)]
            jitter = rng.normal(0, 6 + 3 * d, (n_boxes, 4)).astype(np.float32)
            boxes = centre + jitter
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
            iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(faces)).max(1)
            score = np.clip(iou.values.numpy() * 0.5 + rng.uniform(0, 0.5, n_boxes), 0, 1).astype(np.float32)
            dets.append(pd.DataFrame({
                "image_id": image_id, "detector": det, "scale": 0, "flip": False,
                "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3], "score": score,
                "oracle_iou": iou.values.numpy().astype(np.float32), "gt_id": iou.indices.numpy().astype(np.int32)}))
    images = pd.DataFrame(rows)
    write_table(images, layout.images(name), "images", provenance("index", {}, root=str(root)))
    detections = pd.concat(dets, ignore_index=True)
    for det in detectors:
        part = detections[detections["detector"] == det]
        ids = sorted(part["image_id"].unique())
        for k, chunk in enumerate((ids[: len(ids) // 2], ids[len(ids) // 2:])):
            write_table(part[part["image_id"].isin(chunk)], layout.oracle(name, det, "original", k), "detections",
                        provenance("oracle", {}), sort_by=[("image_id", "ascending"), ("score", "descending")])
    return images


def fixed_batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = 4
    oracle = torch.rand(b, N, generator=g)
    score = (oracle + 0.6 * torch.rand(b, N, generator=g)).clamp(0, 1)
    order = score.argsort(dim=1, descending=True)
    score, oracle = score.gather(1, order), oracle.gather(1, order)
    boxes = torch.cat([torch.rand(b, N, 2, generator=g) * 0.8, torch.full((b, N, 2), 0.1), score.unsqueeze(-1)], 2)
    mask = torch.ones(b, N, dtype=torch.bool)
    mask[1, 50:] = False
    image = torch.randn(b, 3, config.image_size, config.image_size, generator=g)
    return {"image": image, "boxes": boxes, "mask": mask, "oracle": oracle * mask}


@pytest.mark.parametrize("image_branch, steps", [("none", 40), ("fpn", 10)])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(image_branch, steps):
    config = RankerConfig(num_boxes=N, backbone="mobilenet", image_branch=image_branch, image_size=64)
    torch.manual_seed(0)
    trainer = Trainer(build_ranker(config), TrainConfig(iterations=30, lr=3e-3, lr_final=1e-3, n_pairs=3),
                      torch.device("cpu"))
    batch = fixed_batch(config)
    losses = [trainer.train_step(batch)[0] for _ in range(steps)]
    assert losses[-1] < losses[0] - 0.01


def test_lr_decays_exponentially_to_final():
    cfg = TrainConfig(iterations=101, lr=1e-3, lr_final=1e-6)
    assert lr_at(0, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-6)
    assert lr_at(50, cfg) == pytest.approx(10 ** -4.5)


def _run(layout, ranker, stop_after=None, backbone="mobilenet", branch="fpn", iterations=4):
    values = {"model": "network", "num_boxes": N, "backbone": backbone, "image_branch": branch, "image_size": 64,
              "iterations": iterations, "batch_size": 3, "log_every": 1, "n_pairs": 3, "lr": 1e-3, "lr_final": 1e-4}
    fitted = rankerio.train(layout, ranker, ["toy"], ["detA", "detB"], "original", values,
                            chosen=rankerio.chosen_images(layout, ["toy"], None, None), checkpoint_every=100,
                            device="cpu", stop_after=stop_after)
    return fitted.summary


@pytest.mark.slow
def test_resume_after_interruption_is_bit_exact(tmp_path):
    layout_a, layout_b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    make_dataset(tmp_path / "rawa", layout_a)
    make_dataset(tmp_path / "rawb", layout_b)
    _run(layout_a, "r")
    first = _run(layout_b, "r", stop_after=2)
    assert first["steps"] == 2 and not layout_b.ranker_model("r").exists()
    assert (layout_b.ranker_dir("r") / "checkpoint.pt").exists()
    _run(layout_b, "r")  # a fresh process would do exactly this: rebuild, load checkpoint, go on
    a = torch.load(layout_a.ranker_model("r"), weights_only=True)["state_dict"]
    b = torch.load(layout_b.ranker_model("r"), weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = read_table(layout_a.ranker_dir("r") / "train_log.parquet", "train_log")
    log_b = read_table(layout_b.ranker_dir("r") / "train_log.parquet", "train_log")
    cols = ["step", "loss", "lr", "pair_accuracy"]
    assert log_a["step"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(log_a[cols], log_b[cols])
    assert (layout_a.ranker_dir("r") / "loss.png").stat().st_size > 0


def test_checkpoint_of_another_config_is_refused_unless_its_run_finished(tmp_path, capsys):
    layout = Layout(tmp_path / "d")
    make_dataset(tmp_path / "raw", layout)
    _run(layout, "r", stop_after=1, branch="none")
    with pytest.raises(ConfrankError, match="unfinished run with a different training configuration"):
        _run(layout, "r", branch="none", iterations=5)
    # a finished run: changing a setting (what snakemake's params trigger reruns) retrains
    finished = _run(layout, "r", branch="none")
    assert finished["steps"] == 4
    retrained = _run(layout, "r", branch="none", iterations=5)
    assert retrained["steps"] == 5 and "other settings; training from scratch" in capsys.readouterr().err
    assert len(read_table(layout.ranker_dir("r") / "train_log.parquet", "train_log")) == 5


def test_train_and_rerank_cli(tmp_path):
    data = tmp_path / "data"
    layout = Layout(data)
    make_dataset(tmp_path / "raw", layout)
    runner = CliRunner()
    ids = tmp_path / "ids.txt"
    ids.write_text("0--Toy/img_0\n0--Toy/img_2\n# comment\n0--Toy/img_4\n")
    res = runner.invoke(train_stage.cli, [
        "--datasets", "toy", "--detectors", "detA,detB", "--scales", "original", "--ranker", "box",
        "--image-branch", "none", "--iterations", "3", "--batch-size", "2", "--num-boxes", "32",
        "--images", str(ids), "--workers", "0", "--device", "cpu", "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    trained_on = (layout.ranker_dir("box") / "train_images.txt").read_text().split()
    assert trained_on == ["toy", "0--Toy/img_0", "toy", "0--Toy/img_2", "toy", "0--Toy/img_4"]
    res = runner.invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detB", "--scales", "original",
                                           "--ranker", "box", "--device", "cpu", "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    src = shard_paths(layout.oracle_dir("toy", "detB", "original"))
    out = shard_paths(layout.reranked_dir("box", "toy", "detB", "original"))
    assert [p.name for p in out] == [p.name for p in src]
    before, after = read_tables(src, "detections"), read_tables(out, "detections")
    pd.testing.assert_frame_equal(before, after.drop(columns="rank_score"))
    assert after["rank_score"].dtype == np.float32 and after["rank_score"].between(0, 1).all()
    # 40 boxes per image, N = 32: the 8 lowest-scored keep their detector score
    for _, group in after.groupby("image_id"):
        tail = group.sort_values("score", ascending=False, kind="stable").iloc[32:]
        assert len(tail) == 8 and (tail["rank_score"] == tail["score"]).all()
    # recomputing (the shards removed first, so nothing can be skipped) gives identical bytes
    first = [p.read_bytes() for p in out]
    for p in out:
        p.unlink()
    res = runner.invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detB", "--scales", "original",
                                           "--ranker", "box", "--device", "cpu", "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    assert [p.read_bytes() for p in out] == first


def test_rerank_refuses_a_foreign_model(tmp_path):
    layout = Layout(tmp_path / "data")
    make_dataset(tmp_path / "raw", layout)
    path = layout.ranker_model("alien")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ConfrankError, match="not a confrank ranker"):
        rerank_stage.run_rerank(layout, "toy", "detA", "original", "alien", device="cpu")
    path.write_bytes(b"not a torch file")
    with pytest.raises(ConfrankError, match="not a confrank ranker"):
        rerank_stage.run_rerank(layout, "toy", "detA", "original", "alien", device="cpu")


def test_rerank_with_an_image_model(tmp_path):
    layout = Layout(tmp_path / "data")
    make_dataset(tmp_path / "raw", layout, n_images=3)
    _run(layout, "img", iterations=1)
    written = rerank_stage.run_rerank(layout, "toy", "detA", "original", "img", device="cpu", batch_size=2)
    out = read_tables(written, "detections")
    assert len(out) == 3 * 40 and out["rank_score"].between(0, 1).all()
    assert not np.array_equal(out["rank_score"].to_numpy(), out["score"].to_numpy())
