"""CalibrationSet: the ``(x_t, t, cond)`` a denoiser saw along its sampling trajectories, and collect()."""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import diffpress.conditions as conditions
from diffpress._io import atomic_file, check_writable
from diffpress.calibration.policies import TimestepPolicy
from diffpress.denoiser import Denoiser
from diffpress.errors import DiffpressError
from diffpress.sampling import sample

FORMAT = "diffpress.calibration/1"


@dataclass
class CalibrationSet:
    """Denoiser inputs drawn from sampling trajectories, ordered by step.

    ``x`` (N, C, H, W), ``t`` (N,) the timestep values, ``step`` (N,) the trajectory index, ``cond``
    (N, ...) or None. With guidance both branches are present (conditional and null condition).
    ``batches`` streams it in step order; a set loaded with ``lazy=True`` reads each batch from disk.

    >>> import torch
    >>> cs = CalibrationSet(torch.zeros(4, 1, 8, 8), torch.tensor([900., 900., 100., 100.]), None,
    ...                     torch.tensor([0, 0, 1, 1]))
    >>> [tuple(x.shape) for x, t, c in cs.batches(3)]
    [(2, 1, 8, 8), (2, 1, 8, 8)]
    """

    x: torch.Tensor | None
    t: torch.Tensor
    cond: conditions.Cond  # one tensor, a dict of named parts, or None
    step: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    _path: Path | None = None
    _cond_keys: tuple[str, ...] = ()  # keys of cond in the file (lazy sets read them per batch)

    def __post_init__(self) -> None:
        self._cond_keys = self._cond_keys or tuple(conditions.flatten(self.cond))
        if self.x is not None:
            _check_finite(self.x, self.t, self.cond)

    def __len__(self) -> int:
        return len(self.t)

    @property
    def timesteps(self) -> list[float]:
        """Distinct timestep values, in sampling order (high noise first)."""
        return sorted({float(v) for v in self.t}, reverse=True)

    def _slice(self, name: str, lo: int, hi: int):
        if self._path is None:
            return conditions.take(getattr(self, name), slice(lo, hi))
        keys = self._cond_keys if name == "cond" else (name,)
        with safe_open(str(self._path), framework="pt") as f:
            return conditions.unflatten({k: f.get_slice(k)[lo:hi] for k in keys}, name)

    def ranges(self, batch_size: int = 32) -> list[tuple[int, int]]:
        """The ``(start, end)`` rows of each batch :meth:`batches` yields: at most ``batch_size`` rows of one step."""
        n, lo, out = len(self), 0, []
        while lo < n:
            s = int(self.step[lo])
            end = lo
            while end < n and int(self.step[end]) == s and end - lo < batch_size:
                end += 1
            out.append((lo, end))
            lo = end
        return out

    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, conditions.Cond]:
        """Rows ``lo:hi`` as ``(x, t, cond)`` (read from disk for a lazy set)."""
        return self._slice("x", lo, hi), self.t[lo:hi], self._slice("cond", lo, hi) if self._cond_keys else None

    def rows(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, conditions.Cond]:
        """Any rows, in the order given, as ``(x, t, cond)`` (training on shuffled points)."""
        if self.x is not None:
            idx = torch.as_tensor(index, dtype=torch.long)
            return self.x[idx], self.t[idx], conditions.take(self.cond, idx)
        parts = [self.batch(i, i + 1) for i in index]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                conditions.cat(*(p[2] for p in parts)))

    def batches(self, batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(x, t, cond)`` batches, each from a single trajectory step (so per-timestep statistics stay apart)."""
        for lo, hi in self.ranges(batch_size):
            yield self.batch(lo, hi)

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write one safetensors file (tensors + JSON metadata), atomically."""
        if self.x is None:
            raise DiffpressError("this set was loaded lazily; it already lives at " + str(self._path))
        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous(), "step": self.step.contiguous()}
        tensors.update(conditions.flatten(self.cond))
        with atomic_file(path, force=force) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(self.meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False) -> "CalibrationSet":
        """Read a set written by :meth:`save`; ``lazy=True`` keeps ``x`` and ``cond`` on disk."""
        path = Path(path)
        if not path.is_file():
            raise DiffpressError(f"no calibration file at {path}; create one with diffpress.calibrate(...).save(path)")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise DiffpressError(f"{path} is not a diffpress calibration set (format {md.get('format')!r})")
                keys = set(f.keys())
                t, step = f.get_tensor("t"), f.get_tensor("step")
                x = None if lazy else f.get_tensor("x")
                cond_keys = tuple(sorted(k for k in keys if k == "cond" or k.startswith("cond.")))
                cond = None if lazy else conditions.unflatten({k: f.get_tensor(k) for k in cond_keys})
                if lazy:  # check the data section is whole before promising to stream it
                    f.get_slice("x")[len(t) - 1:len(t)]
                meta = json.loads(md.get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DiffpressError(f"{path} is corrupt or truncated ({exc}); collect the calibration set again") from exc
        return cls(x, t, cond, step, meta if isinstance(meta, dict) else {}, _path=path if lazy else None,
                   _cond_keys=cond_keys)


def _check_finite(x: torch.Tensor, t: torch.Tensor, cond: conditions.Cond) -> None:
    for name, v in (("x", x), ("t", t), *conditions.flatten(cond).items()):
        if v is not None and v.is_floating_point() and not torch.isfinite(v).all():
            bad = sorted({float(s) for s in t[~torch.isfinite(v).flatten(1).all(1)]}) if v.dim() > 1 else []
            raise DiffpressError(
                f"calibration data {name!r} contains NaN or inf" + (f" at timesteps {bad}" if bad else "")
                + "; the model diverged while sampling or the inputs are bad: fix the model or the inputs, "
                  "then collect again")


def collect(
    denoiser: Denoiser,
    *,
    num_samples: int = 64,
    steps: int = 50,
    scheduler: str | None = "auto",
    guidance: float | None = None,
    policy: TimestepPolicy | None = None,
    labels: torch.Tensor | None = None,
    cond: conditions.Cond = None,
    uncond: conditions.Cond = None,
    seed: int = 1000,
    batch_size: int = 64,
    path: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> CalibrationSet:
    """Run the full-precision sampler and keep the denoiser inputs at the steps ``policy`` selects.

    Seeds start at 1000 by default, apart from the evaluation seeds (0, 1, ...), so quality is never
    measured on the calibration trajectories. Conditional models get labels ``0..num_classes-1``
    repeated unless ``labels`` or ``cond`` is given (``uncond``: the guidance null per sample, default the
    model's null condition); with guidance both branches are kept.

    With ``path`` the set streams to disk: each chunk of ``batch_size`` trajectories is written as it is
    sampled, the chunks are joined into the safetensors file at ``path`` piece by piece, and the set comes back
    loaded lazily, so memory holds one chunk, not the set (for SD-sized models). Under ``torchrun`` each process
    samples its share of the chunks (chunk ``i`` on rank ``i % N``, see :mod:`diffpress.distributed`) and every
    process gets the same set, bit-identical to a single process's; with ``path`` rank 0 writes the file (on
    several machines ``path`` must be on a shared file system). ``meta`` adds entries to the set's metadata.

    >>> from diffpress import load
    >>> cs = collect(load("digits-cond-unet"), num_samples=4, steps=10,
    ...              policy=TimestepPolicy("uniform", count=3), progress=False)
    >>> len(cs), len(cs.timesteps)  # 4 samples x 2 CFG branches x 3 steps
    (24, 3)
    """
    import diffpress.distributed as distributed

    policy = policy or TimestepPolicy()
    if guidance is None:
        guidance = denoiser.default_guidance
    if cond is None and labels is None and denoiser.cond_kind != "none":
        if denoiser.num_classes is None:
            raise DiffpressError("this model is conditioned on hidden states; pass cond= (one tensor per sample, or "
                                 "a dict of them) to collect, e.g. from diffpress.conditions_from(...) or a recipe's "
                                 "calibration.conditions")
        labels = torch.arange(num_samples) % denoiser.num_classes
    if cond is not None and conditions.batch_size(cond) < num_samples:
        raise DiffpressError(f"{conditions.batch_size(cond)} conditions for {num_samples} calibration samples; give "
                             "at least one condition per sample")
    if path is not None:
        path = check_writable(path, force=False)
    chunks = [(lo, min(lo + batch_size, num_samples)) for lo in range(0, num_samples, batch_size)]
    parts_dir = None if path is None else path.parent / f".{path.name}.parts"
    if parts_dir is not None and distributed.is_main():
        shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(parents=True)
    distributed.barrier()
    done: dict[int, Any] = {}  # chunk index -> {step: (x, t, cond)} or the chunk's file
    timesteps: dict[int, float] = {}
    mine = distributed.mine(len(chunks))
    with tqdm(total=sum(chunks[i][1] - chunks[i][0] for i in mine), desc="calibration trajectories",
              disable=not progress or not distributed.is_main(), leave=False) as bar:
        for i in mine:
            lo, hi = chunks[i]
            kw: dict[str, Any] = {}
            if labels is not None:
                kw["labels"] = torch.as_tensor(labels)[lo:hi]
            elif cond is not None:
                kw["cond"] = conditions.take(cond, slice(lo, hi))
                kw["uncond"] = conditions.take(uncond, slice(lo, hi))  # None: the model's null condition
            else:
                kw["num_samples"] = hi - lo
            with denoiser.runtime.using(mode="calibrate"):
                out = sample(denoiser, steps=steps, scheduler=scheduler, guidance=guidance, seed=seed + lo,
                             batch_size=hi - lo, record=True, progress=False, **kw)
            traj = out.trajectory
            picked = {s: traj.inputs(s) for s in policy.select(len(traj))}
            timesteps.update({s: float(traj.timesteps[s]) for s in picked})
            if parts_dir is None:
                done[i] = picked
            else:  # the chunk as a set of its own (checked finite), on disk
                chunk = CalibrationSet(*_join({(s, i): v for s, v in picked.items()}))
                chunk.save(parts_dir / f"chunk{i:06d}.safetensors")
                done[i] = None
            bar.update(hi - lo)
    done = distributed.gather_pieces(done)
    for part in distributed.gather(timesteps):
        timesteps.update(part)
    selected = sorted(timesteps)
    meta = {"policy": policy.__dict__, "num_samples": num_samples, "steps": steps,
            "scheduler": scheduler or "model default", "guidance": guidance, "seed": seed,
            "sample_shape": list(denoiser.sample_shape), "cond_kind": denoiser.cond_kind,
            "selected_steps": selected, "timesteps": [timesteps[s] for s in selected], **(meta or {})}
    if parts_dir is None:
        return CalibrationSet(*_join({(s, i): done[i][s] for s in selected for i in done}), meta)
    try:
        if distributed.is_main():
            files = [parts_dir / f"chunk{i:06d}.safetensors" for i in done]
            _join_files(files, path, meta)
        distributed.barrier()
    finally:
        if distributed.is_main():
            shutil.rmtree(parts_dir, ignore_errors=True)
    return CalibrationSet.load(path, lazy=True)


def _join(picked: dict) -> tuple:
    """``{(step, chunk): (x, t, cond)}`` -> x, t, cond, step: the arguments of a :class:`CalibrationSet`, in step
    order, then chunk order."""
    xs, ts, cs, ss = [], [], [], []
    for (s, _), (x, t, c) in sorted(picked.items()):
        xs.append(x)
        ts.append(t.float())
        ss.append(torch.full((len(x),), s, dtype=torch.long))
        if c is not None:
            cs.append(c)
    return torch.cat(xs), torch.cat(ts), conditions.cat(*cs) if cs else None, torch.cat(ss)


def _join_files(files: list[Path], path: Path, meta: dict) -> None:
    """Write the chunks' sets (each ordered by step) as one set ordered by step, then chunk, to ``path``: a
    safetensors file written tensor by tensor, step by step, so that memory holds one slice at a time."""
    handles = [safe_open(str(f), framework="pt") for f in files]
    rows = {}  # (step, chunk) -> the chunk's rows of that step (contiguous: a chunk's set is in step order)
    for j, h in enumerate(handles):
        steps, counts = h.get_tensor("step").unique_consecutive(return_counts=True)
        for s, n, end in zip(steps.tolist(), counts.tolist(), counts.cumsum(0).tolist()):
            rows[(s, j)] = (end - n, end)
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "meta": json.dumps(meta)}}
    names = list(handles[0].keys())
    offset = 0
    for name in names:
        first = handles[0].get_slice(name)
        shape = [sum(h.get_slice(name).get_shape()[0] for h in handles), *first.get_shape()[1:]]
        size = first[0:1].element_size() * int(torch.Size(shape).numel())
        header[name] = {"dtype": first.get_dtype(), "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            for s, j in sorted(rows):  # step order, then chunk order
                lo, hi = rows[(s, j)]
                out.write(handles[j].get_slice(name)[lo:hi].contiguous().view(torch.uint8).numpy().tobytes())
