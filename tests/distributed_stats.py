"""Run by tests/test_distributed.py, alone and under ``torchrun``: calibrate the zoo's digits-dit, observe its
linears (inputs and outputs) and write the calibration set and the statistics (rank 0).

    python tests/distributed_stats.py OUT_DIR [--stream]
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffpress
from diffpress import distributed
from diffpress.calibration import TimestepPolicy, collect
from diffpress.calibration.observers import observe


def main(out: Path, stream: bool) -> None:
    distributed.init()
    den = diffpress.load("digits-dit")
    cs = collect(den, num_samples=6, steps=6, policy=TimestepPolicy("uniform", count=3), batch_size=2,
                 path=out / "cal.safetensors" if stream else None, progress=False)
    layers = {n: None for n, m in den.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = observe(den, cs, layers, outputs=True, batch_size=4, max_samples=512, progress=False)
    if distributed.is_main():
        flat = {}
        for name, kinds in stats.items():
            for kind, parts in kinds.items():
                for j, store in enumerate(parts):
                    for t, st in store.items():
                        key = f"{name}|{kind}|{j}|{t}"
                        flat[f"{key}|samples"] = st.samples.contiguous()
                        flat[f"{key}|min_max_count"] = torch.tensor([st.min, st.max, st.count], dtype=torch.float64)
        save_file(flat, str(out / "stats.safetensors"), metadata={"order": json.dumps(list(flat))})
        if not stream:
            cs.save(out / "cal.safetensors")
    distributed.finish()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--stream" in sys.argv[2:])
