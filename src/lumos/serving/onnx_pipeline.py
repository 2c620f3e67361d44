"""Sampling on onnxruntime: DPM-Solver++ (multistep, order 2) with classifier-free guidance.

The denoiser and the decoder run as the exported ONNX graphs; conditions and latents are numpy.
The solver is diffusers' `DPMSolverMultistepScheduler`, built by `lumos.diffusion.make_scheduler`
on the noise schedule recorded in export.json, so the update is the one the PyTorch path
(`lumos.diffusion.sampling.sample`) uses; it works on torch tensors, and converting the (small)
latents between numpy and torch once per step costs nothing next to a denoiser call.

Guidance follows `sample`: one denoiser call per step on [conditional; unconditional] rows, the
second half with `force_drop=True` (the null embedding is inside the graph).

    pipe = OnnxPipeline.from_uri("s3://lumos/runs/r1/export/t2i")
    images = pipe({"cond": text_embeds, "cond_mask": mask, "micro_cond": sizes}, seed=0)  # uint8
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lumos.errors import NotFoundError
from lumos.export.onnx_export import EXPORT_JSON, OUTPUT_NAME, read_export
from lumos.export.tensorrt import onnxruntime_providers, select_providers

if TYPE_CHECKING:
    from lumos.encoders.sizes import Part

_NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


def served_encoders(meta: dict) -> tuple[Part, ...]:
    """The frozen encoders the server loads for an export (its export.json): T5 for text-to-image;
    DINO for the image-conditioned heads, and the VAE when the head also takes the input image's
    latent (`concat_latent`)."""
    if meta["head"] == "t2i":
        return ("text_encoder",)
    inputs = {spec["name"] for spec in meta["graphs"]["denoiser"]["inputs"]}
    return ("image_encoder", "vae") if "concat_latent" in inputs else ("image_encoder",)


class OnnxPipeline:
    """An exported Lumos model on onnxruntime: condition -> latents -> images."""

    def __init__(self, export_dir: str | Path, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.meta = read_export(str(self.export_dir))
        self.head: str = self.meta["head"]
        self.model_config: dict = self.meta["model_config"]
        self.providers = list(providers or select_providers(onnxruntime_providers()))
        graphs = self.meta["graphs"]
        self.denoiser = ort.InferenceSession(
            str(self.export_dir / graphs["denoiser"]["file"]), providers=self.providers
        )
        # name -> (shape with "batch", dtype), as recorded at export: requests are checked against it.
        self.input_specs = {
            spec["name"]: (spec["shape"], spec["dtype"]) for spec in graphs["denoiser"]["inputs"]
        }
        self.decoder = None
        if "decoder" in graphs:
            self.decoder = ort.InferenceSession(
                str(self.export_dir / graphs["decoder"]["file"]), providers=self.providers
            )
        elif (self.meta.get("decoder") or {}).get("kind") == "vae":
            raise ValueError(
                f"export {self.export_dir} is a latent (VAE) model without decoder.onnx: "
                "re-export with export_decoder=true to serve images"
            )

    @classmethod
    def from_uri(
        cls,
        export_uri: str,
        local_dir: str | Path | None = None,
        providers: Sequence[str] | None = None,
    ) -> OnnxPipeline:
        """Download an export (local or s3://) to `local_dir` (a temporary dir if None) and load it."""
        from lumos.storage import LocalStorage, Storage

        store = Storage.from_uri(export_uri)
        if isinstance(store, LocalStorage) and local_dir is None:
            return cls(store.root, providers)
        if not store.exists(EXPORT_JSON):
            raise NotFoundError(
                f"no {EXPORT_JSON} at {store.uri}: is it the output of `lumos export`?"
            )
        if local_dir is None:
            local_dir = tempfile.mkdtemp(prefix="lumos-serve-")
        store.download_dir("", local_dir)
        return cls(local_dir, providers)

    # ------------------------------------------------------------------ shapes

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape: (C, H, W), or (F, C, H, W) for multi-frame heads."""
        shape = self.input_specs["x"][0]
        return tuple(int(d) for d in shape[1:])

    @property
    def num_frames(self) -> int:
        """Frames (views) per sample: 1 for single-image heads."""
        return int(self.model_config["num_frames"])

    @property
    def condition_names(self) -> list[str]:
        """The inputs a caller provides (everything but x, t and force_drop)."""
        return [n for n in self.input_specs if n not in ("x", "t", "force_drop")]

    def _check_inputs(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        names = set(self.condition_names)
        if set(inputs) != names:
            raise ValueError(
                f"head {self.head!r} needs inputs {sorted(names)}, got {sorted(inputs)}"
            )
        checked = {}
        for name in self.condition_names:
            shape, dtype = self.input_specs[name]
            value: np.ndarray = np.asarray(inputs[name]).astype(_NUMPY_DTYPES[dtype], copy=False)
            expected = tuple(batch if d == "batch" else int(d) for d in shape)
            if value.shape != expected:
                raise ValueError(f"input {name!r} must have shape {expected}, got {value.shape}")
            checked[name] = value
        return checked

    # ------------------------------------------------------------------ sampling

    def denoise(self, x: np.ndarray, t: np.ndarray, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One denoiser call: (N, [F,] 2C, H, W)."""
        feed = {"x": x.astype(np.float32, copy=False), "t": t.astype(np.int64), **inputs}
        (out,) = self.denoiser.run([OUTPUT_NAME], feed)
        return out

    @property
    def latent_range(self) -> float | None:
        """1.0 for pixel-space exports (their x0 predictions are thresholded to [-1, 1], as
        `FrozenEncoders.latent_range` makes `sample` do), None for VAE latents."""
        return None if (self.meta.get("decoder") or {}).get("kind") == "vae" else 1.0

    def sample_latents(
        self,
        inputs: dict[str, np.ndarray],
        *,
        steps: int = 20,
        guidance_scale: float = 4.5,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        null_inputs: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Latents (B, [F,] C, H, W) for the conditions `inputs` (numpy, batch B).

        Noise: `noise` if given, else `torch.randn` from a CPU generator seeded with `seed`, which
        is the noise `sample(..., generator=torch.Generator().manual_seed(seed))` draws.
        `null_inputs` overrides inputs of the unconditional half, as `sample`'s null_kwargs.
        """
        import torch

        from lumos.diffusion.gaussian import GaussianDiffusion
        from lumos.diffusion.sampling import make_scheduler

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not inputs:
            raise ValueError(f"head {self.head!r} needs inputs {self.condition_names}, got none")
        batch = len(next(iter(inputs.values())))
        inputs = self._check_inputs(inputs, batch)
        shape = (batch, *self.latent_shape)
        if noise is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
            noise = torch.randn(shape, generator=generator).numpy()
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")

        use_cfg = guidance_scale != 1.0
        drop = np.zeros(batch, dtype=bool)
        if use_cfg:
            uncond = {**inputs, **(null_inputs or {})}
            feed = {k: np.concatenate([v, uncond[k].astype(v.dtype)]) for k, v in inputs.items()}
            feed["force_drop"] = np.concatenate([drop, np.ones(batch, dtype=bool)])
        else:
            feed = {**inputs, "force_drop": drop}

        d = self.meta["diffusion"]
        scheduler: Any = make_scheduler(
            GaussianDiffusion(d["num_timesteps"], d["beta_start"], d["beta_end"]),
            clip_x0=self.latent_range,
            prediction_type=d.get("prediction", "epsilon"),
        )
        scheduler.set_timesteps(steps)
        channels = shape[-3]
        x = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
        for t in scheduler.timesteps:
            x_np = x.numpy()
            x_in = np.concatenate([x_np, x_np]) if use_cfg else x_np  # ([2]B, [F,] C, H, W)
            t_in = np.full(x_in.shape[0], int(t), dtype=np.int64)  # ([2]B,)
            out = self.denoise(x_in, t_in, feed)  # ([2]B, [F,] 2C, H, W)
            eps = out[..., :channels, :, :]  # ([2]B, [F,] C, H, W)
            if use_cfg:
                eps_cond, eps_uncond = eps[:batch], eps[batch:]
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(torch.from_numpy(np.ascontiguousarray(eps)), t, x).prev_sample
        return x.numpy()

    # ------------------------------------------------------------------ decoding

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (B, [F,] C, h, w) -> float images (B, [F,] 3, H, W) in [-1, 1].

        Through decoder.onnx for a VAE model; in pixel space the latents are the images.
        """
        if self.decoder is None:
            return np.clip(latents, -1.0, 1.0)
        lead = latents.shape[:-3]
        flat = latents.reshape(-1, *latents.shape[-3:]).astype(np.float32)  # (N, C, h, w)
        (images,) = self.decoder.run([OUTPUT_NAME], {"latents": flat})  # (N, 3, H, W)
        return images.reshape(*lead, *images.shape[1:])

    def __call__(self, inputs: dict[str, np.ndarray], **sample_kwargs: Any) -> np.ndarray:
        """uint8 images (B, [F,] H, W, 3) for the conditions `inputs`; see `sample_latents`."""
        return to_uint8(self.decode(self.sample_latents(inputs, **sample_kwargs)))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) floats in [-1, 1] -> (..., H, W, 3) uint8, rounded as FrozenEncoders does."""
    images = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(images, -3, -1)
