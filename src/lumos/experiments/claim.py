"""`lumos experiment claim`: the paper's claims, trained and measured by the pipeline's own stages.

    result = run_claim(ExperimentConfig.from_preset("experiment-cpu"), "runs/claim")
    # runs/claim/report/report.md, runs/claim/report/results.json

Steps, each an existing stage function (nothing re-implemented):
1. data: scenes with ground truth (`lumos.data.scenes`) and the embedded generator's views and
   clips, ingested (`lumos.data.ingest.ingest`) twice for the images: every caption paired
   (arm A) and `paired_fraction` of them (arms B-D; the hash-chosen subset, a subset of A's).
2. the condition encoder: a ViT trained self-supervised on the unlabeled pool (every training
   image, captions ignored; `lumos.encoders.ssl`), saved as a transformers ViTModel, so featurize
   loads it by path as it loads DINO; its linear-probe accuracy per attribute beside the random
   tiny ViT's (the ablation, `condition_encoder: random` runs the arms with it).
3. featurize (`lumos.training.featurize.featurize`) every dataset with that encoder.
4. per seed, training (`lumos.training.train.train`): the I2I prior on the unlabeled pool; arms
   A (T2I from scratch, every pair), B (from scratch, the few pairs), C (from the I2I prior, the
   few pairs), D (from scratch, the few pairs, C's total steps: pretraining + fine-tuning); then
   novel-view and video heads from the I2I prior and from arm A's T2I model, the same steps.
   T2I from scratch is `init: scratch` (a fresh model from the model factory, no `init_from`).
5. measurement (`lumos.experiments.measure`, through `lumos.evaluation.evaluate`'s sampler and
   feature space) at `eval_points` checkpoints per arm, and the report (`lumos.experiments.report`).

A rerun with the same output directory reuses what is there: ingest and featurize skip unchanged
work, and `train()` resumes or returns a finished run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lumos.configs.experiment import ExperimentConfig

logger = logging.getLogger(__name__)

ARMS: dict[str, str] = {
    "A": "T2I from scratch, 100% of the pairs",
    "B": "T2I from scratch, the few pairs",
    "C": "T2I from the I2I prior, the few pairs",
    "D": "T2I from scratch, the few pairs, C's total steps",
}
PRIORS = ("i2i", "t2i")  # the multi-frame heads start from the I2I prior or from arm A


def run_claim(
    cfg: ExperimentConfig, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the whole experiment into `out_dir`; returns the results (also in report/results.json)."""
    from lumos.experiments.report import write_report

    root = Path(out_dir).resolve()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _timed(timings, "data", log):
        data = prepare_data(cfg, root, log)
    with _timed(timings, "condition encoder", log):
        encoder = prepare_encoder(cfg, root, data, log)
    with _timed(timings, "featurize", log):
        featurize_all(cfg, data, encoder["encoders"])
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "data": data["counts"],
        "encoder": {k: v for k, v in encoder.items() if k != "encoders"},
        "arms": ARMS,
        "seeds": {},
        "timings_s": timings,
    }
    for seed in cfg.seeds:
        with _timed(timings, f"seed {seed}", log):
            results["seeds"][str(seed)] = run_seed(cfg, root, data, seed, log, results)
        _write_json(root / "report" / "results.json", results)
        write_report(results, root / "report")  # the seeds so far, should a later one fail
    timings["total"] = time.perf_counter() - started
    report = write_report(results, root / "report")
    results["report"] = str(report)
    _write_json(root / "report" / "results.json", results)
    log(f"report: {report}")
    return results


@contextmanager
def _timed(timings: dict[str, float], name: str, log: Callable[[str], None]):
    start = time.perf_counter()
    log(f"[{time.strftime('%H:%M:%S')}] {name} ...")
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    log(f"[{time.strftime('%H:%M:%S')}] {name}: {timings[name]:.0f} s")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# 1. Data


def prepare_data(cfg: ExperimentConfig, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
    from lumos.configs.data import IngestConfig
    from lumos.data.ingest import ingest
    from lumos.data.scenes import generate_scenes
    from lumos.data.synthetic import generate_default_dataset

    source = root / "source"
    done = source / "generated.json"
    if not done.exists():
        scenes = generate_scenes(cfg.scenes, str(source / "scenes"))
        mf = generate_default_dataset(cfg.multiframe, str(source / "multiframe"))
        _write_json(done, {"scenes": scenes, "multiframe": mf.counts})
    generated = json.loads(done.read_text())
    base = IngestConfig(
        resolution=cfg.scenes.resolution,
        image_format="png",  # lossless: the checks read exact colours
        near_duplicate_distance=None,  # plain backgrounds hash alike; views and frames are alike
        shard_max_bytes=2_000_000,
    )
    datasets = {
        "pairs_all": root / "datasets" / "pairs-all",
        "pairs_few": root / "datasets" / "pairs-few",
        "views": root / "datasets" / "views",
        "clips": root / "datasets" / "clips",
    }
    scenes_src = source / "scenes" / "images"
    sources = {
        "pairs_all": (base.model_copy(update={"paired_fraction": 1.0}), scenes_src),
        "pairs_few": (base.model_copy(update={"paired_fraction": cfg.paired_fraction}), scenes_src),
        "views": (base, source / "multiframe" / "views"),
        "clips": (base, source / "multiframe" / "clips"),
    }
    counts: dict[str, Any] = {"generated": generated}
    for name, uri in datasets.items():
        ingest_cfg, source_dir = sources[name]
        ingest(ingest_cfg, str(source_dir), str(uri), False)
        manifest = json.loads((uri / "manifest.json").read_text())  # a full ingest: every sample
        counts[name] = {"ingested": manifest["num_samples"], "paired": manifest["counts"]["paired"]}
    log(f"datasets: {json.dumps(counts)}")
    return {"uris": {k: str(v) for k, v in datasets.items()}, "counts": counts}


def dataset_samples(dataset_uri: str) -> list[tuple[dict[str, Any], np.ndarray]]:
    """Every sample of an ingested dataset: (its record, its uint8 image)."""
    import io

    from PIL import Image

    from lumos.data.shards import iter_shard_records
    from lumos.storage import Storage

    store = Storage.from_uri(dataset_uri)
    out = []
    for shard in store.read_json("manifest.json")["shards"]:
        for _, files in iter_shard_records(store, shard["name"]):
            record = json.loads(files["json"])
            data = next(files[e] for e in ("png", "jpg") if e in files)
            with Image.open(io.BytesIO(data)) as img:
                out.append((record, np.asarray(img.convert("RGB"), dtype=np.uint8)))
    return out


def paired_training_images(dataset_uri: str) -> np.ndarray:
    """The paired training images of a dataset (the memorisation check's reference), (M, H, W, 3)."""
    images = [
        im
        for r, im in dataset_samples(dataset_uri)
        if r.get("paired") and (r.get("meta") or {}).get("split") != "eval"
    ]
    return np.stack(images) if images else np.zeros((0, 1, 1, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# 2. The condition encoder


def _probe_labels(records: list[dict[str, Any]]) -> tuple[dict[str, list[str]], np.ndarray]:
    """Labels of the linear probes: colour, shape, size and cell of single-object scenes (the
    object of the scene is then defined), and the number of objects over every scene."""
    scenes = [(r.get("meta") or {})["scene"] for r in records]
    single = np.array([s["kind"] == "single" for s in scenes])
    labels = {
        a: [s["objects"][0][a] for s in scenes if s["kind"] == "single"]
        for a in ("color", "shape", "size", "position")
    }
    labels["count"] = [str(len(s["objects"])) for s in scenes]
    return labels, single


def probe_encoder(image_encoder: Any, images: np.ndarray, records: list[dict], seed: int) -> dict:
    """Linear-probe accuracy per attribute of a frozen image encoder's CLS (the I2I condition)."""
    import torch

    from lumos.configs.encoders import EncodersConfig
    from lumos.encoders import FrozenEncoders
    from lumos.encoders.ssl import linear_probe

    encoders = FrozenEncoders(EncodersConfig(vae={"kind": "pixel"}, image_encoder=image_encoder))
    feats = torch.cat(
        [encoders.embed_images(images[i : i + 256]) for i in range(0, len(images), 256)]
    ).numpy()  # (N, D)
    labels, single = _probe_labels(records)
    count = linear_probe(feats, {"count": labels.pop("count")}, seed=seed)
    return linear_probe(feats[single], labels, seed=seed) | count


def prepare_encoder(
    cfg: ExperimentConfig, root: Path, data: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Train the SSL ViT on the unlabeled pool (once), probe it and the random ViT, and return the
    encoders config featurize uses."""
    from lumos.configs.encoders import (
        EncodersConfig,
        ImageEncoderConfig,
        TextEncoderConfig,
        TinyViTConfig,
    )
    from lumos.encoders.ssl import train_ssl_encoder

    samples = [
        (r, im)
        for r, im in dataset_samples(data["uris"]["pairs_few"])
        if (r.get("meta") or {}).get("split") != "eval"
    ]
    records, images = [r for r, _ in samples], np.stack([im for _, im in samples])
    ssl_dir = root / "encoders" / "ssl-vit"
    summary_path = root / "encoders" / "ssl-vit.json"
    if not summary_path.exists():
        result = train_ssl_encoder(cfg.ssl_encoder, images, ssl_dir, device=_device(cfg))
        _write_json(summary_path, result.model_dump(mode="json"))
    training = json.loads(summary_path.read_text())
    res = cfg.scenes.resolution
    ssl = ImageEncoderConfig(path=str(ssl_dir), image_size=res)
    random = ImageEncoderConfig(tiny=TinyViTConfig(image_size=res), seed=cfg.ssl_encoder.seed)
    probes = {
        "ssl": probe_encoder(ssl, images, records, cfg.ssl_encoder.seed),
        "random": probe_encoder(random, images, records, cfg.ssl_encoder.seed),
    }
    log(f"linear probes: {json.dumps(probes)}")
    encoders = EncodersConfig(
        vae={"kind": "pixel"},
        image_encoder=ssl if cfg.condition_encoder == "ssl" else random,
        text_encoder=TextEncoderConfig(tiny=cfg.text_encoder, max_tokens=cfg.max_tokens),
    )
    return {
        "training": training,
        "pool_images": len(images),
        "probes": probes,
        "condition": cfg.condition_encoder,
        "encoders": encoders,
    }


def _device(cfg: ExperimentConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


# ---------------------------------------------------------------------------------------------
# 3. Featurize


def featurize_all(cfg: ExperimentConfig, data: dict[str, Any], encoders: Any) -> None:
    from lumos.configs.training import FeaturizeConfig
    from lumos.training.featurize import featurize

    fcfg = FeaturizeConfig(encoders=encoders, batch_size=128, progress_bar=False)
    for uri in data["uris"].values():
        featurize(fcfg, uri)


# ---------------------------------------------------------------------------------------------
# 4-5. Training and measuring, per seed


def _train(cfg: ExperimentConfig, head: str, steps: int, seed: int, dataset: str, out: Path,
           init_from: str | None = None) -> dict[str, Any]:  # fmt: skip
    from lumos.configs.training import TrainConfig
    from lumos.training.train import train

    multi = head in ("novel_view", "video")
    every = max(1, -(-steps // cfg.steps.eval_points))  # ceil: eval_points checkpoints
    tcfg = TrainConfig(
        head=head, model_size=cfg.model_size, model_overrides=cfg.model_overrides, steps=steps,
        batch_size=max(1, cfg.batch_size // 4) if multi else cfg.batch_size, lr=cfg.lr,
        warmup_steps=min(cfg.warmup_steps, steps // 2), ema_decay=cfg.ema_decay,
        snr_gamma=cfg.snr_gamma, init="scratch" if init_from is None and head != "i2i" else "prior",
        mixed_precision=cfg.mixed_precision, compile=False, checkpoint_every=every,
        keep_checkpoints=cfg.steps.eval_points + 1, log_every=max(1, steps // 10),
        progress_bar=False, seed=seed,
    )  # fmt: skip
    result = train(tcfg, dataset, str(out), init_from=init_from)
    return {
        "checkpoint": result.checkpoint_uri,
        "steps": result.step,
        "images_seen": result.step * result.global_batch,
        "final_loss": result.final_loss,
        "train_items": result.train_items,
        "images_per_second": result.images_per_second,
        "init_from": init_from,
    }


def t2i_as_prior(t2i_checkpoint: str, i2i_checkpoint: str, out: Path, seed: int) -> str:
    """Arm A's T2I model in the I2I model's shape, so the multi-frame heads can start from it as
    they start from the I2I prior: every backbone weight is the T2I model's; the condition
    projector (T2I's takes text, an image condition needs its own) is freshly initialised and
    T2I's size embedders are dropped, by the same weight transfer fine-tuning uses."""
    import torch

    from lumos.checkpoints import (
        checkpoint_dirname,
        list_checkpoints,
        load_checkpoint,
        save_checkpoint,
    )
    from lumos.heads import HEADS
    from lumos.models.lumos_dit import LumosDiT
    from lumos.models.transfer import transfer_weights

    done = list_checkpoints(str(out))
    if done:
        return done[-1][1]
    source = load_checkpoint(t2i_checkpoint, raw=True)
    shape = load_checkpoint(i2i_checkpoint, raw=False).ema_model.config
    models, report = [], None
    for weights in (source.model, source.ema_model):
        torch.manual_seed(seed)  # the same fresh projector in the raw and the EMA model
        target = LumosDiT.from_config(shape)
        if weights is None:
            raise ValueError(f"{t2i_checkpoint} has no raw weights")
        report = transfer_weights(
            # What T2I adds to the I2I model (its text projector, size embedders) goes back.
            weights.state_dict(),
            target,
            HEADS["t2i"].allowed_new,
            reinitialise=True,
        )
        models.append(target)
    meta = {k: v for k, v in source.meta.items() if k not in ("uri", "format")}
    step = int(meta.get("step") or 0)
    meta.update(head="i2i", converted_from=source.uri,
                transfer_report=report.model_dump() if report else None)  # fmt: skip
    return save_checkpoint(f"{out}/{checkpoint_dirname(step)}", models[0], models[1], meta)


def _eval_checkpoints(out: str, points: int) -> list[tuple[int, str]]:
    from lumos.checkpoints import list_checkpoints

    return list_checkpoints(out)[-points:]


def run_seed(
    cfg: ExperimentConfig,
    root: Path,
    data: dict[str, Any],
    seed: int,
    log: Callable[[str], None],
    results: dict[str, Any],
) -> dict[str, Any]:
    from lumos.experiments.measure import measure_multiframe, measure_t2i, reference_t2i

    uris, ck = data["uris"], root / "checkpoints" / f"seed-{seed}"
    s = cfg.steps
    runs: dict[str, Any] = {}
    runs["i2i"] = _train(cfg, "i2i", s.pretrain, seed, uris["pairs_few"], ck / "i2i")
    log(f"seed {seed}: i2i prior trained ({runs['i2i']['final_loss']})")
    arm_data = {"A": uris["pairs_all"], "B": uris["pairs_few"], "C": uris["pairs_few"],
                "D": uris["pairs_few"]}  # fmt: skip
    arm_steps = {"A": s.t2i, "B": s.t2i, "C": s.t2i, "D": s.pretrain + s.t2i}
    for arm in ARMS:
        init = runs["i2i"]["checkpoint"] if arm == "C" else None
        runs[arm] = _train(cfg, "t2i", arm_steps[arm], seed, arm_data[arm], ck / arm, init)
        runs[arm]["total_steps"] = arm_steps[arm] + (s.pretrain if arm == "C" else 0)
        log(f"seed {seed}: arm {arm} trained ({runs[arm]['final_loss']})")
    priors = {
        "i2i": runs["i2i"]["checkpoint"],
        "t2i": t2i_as_prior(runs["A"]["checkpoint"], runs["i2i"]["checkpoint"],
                            ck / "A-as-prior", seed),
    }  # fmt: skip
    for head, ds in (("novel_view", uris["views"]), ("video", uris["clips"])):
        for prior, init in priors.items():
            key = f"{head}:{prior}"
            runs[key] = _train(cfg, head, s.multiframe, seed, ds, ck / key.replace(":", "-"), init)
            log(f"seed {seed}: {key} trained ({runs[key]['final_loss']})")

    # --- measurements ------------------------------------------------------------------------
    out: dict[str, Any] = {"runs": runs, "t2i": {}, "multiframe": {}}
    if "reference" not in results:
        results["reference"] = reference_t2i(cfg, runs["C"]["checkpoint"], uris["pairs_few"])
        log(f"reference: {json.dumps(results['reference'])}")
    paired = {uri: paired_training_images(uri) for uri in set(arm_data.values())}
    for arm in ARMS:
        curve: list[dict[str, Any]] = []
        points = _eval_checkpoints(str(ck / arm), s.eval_points)
        for i, (step, uri) in enumerate(points):
            final = i == len(points) - 1
            m = measure_t2i(cfg, uri, arm_data[arm], paired[arm_data[arm]] if final else None,
                            step, keep_samples=cfg.grid_items if final else 0)  # fmt: skip
            curve.append({"step": step, "metrics": m.metrics})
            if final and m.samples:
                _save_samples(root / "report" / "samples" / f"seed-{seed}-{arm}.npz", m)
        out["t2i"][arm] = curve
        last: dict[str, dict[str, float]] = curve[-1]["metrics"]
        shown = {g: round(v.get("overall", float("nan")), 3) for g, v in last.items()}
        log(f"seed {seed}: arm {arm} overall accuracy by guidance {shown}")
    for head, ds in (("novel_view", uris["views"]), ("video", uris["clips"])):
        for prior in PRIORS:
            key = f"{head}:{prior}"
            out["multiframe"][key] = measure_multiframe(cfg, runs[key]["checkpoint"], ds)
            log(f"seed {seed}: {key} {json.dumps(out['multiframe'][key])}")
    return out


def _save_samples(path: Path, m: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {k: np.stack(v) for k, v in m.samples.items()}
    arrays["captions"] = np.array(m.captions)
    np.savez_compressed(path, **arrays)
