import pytest
import torch
from diffusers import UNet2DModel

import diffpress
from diffpress import Denoiser
from diffpress.calibration import CalibrationSet, TimestepPolicy, collect
from diffpress.calibration.observers import observe
from diffpress.zoo.models import training_scheduler


@pytest.fixture(scope="module")
def tiny_unet() -> Denoiser:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    return Denoiser(unet.eval(), scheduler_config=training_scheduler())


def test_policies_select_expected_steps():
    assert TimestepPolicy("all").select(5) == [0, 1, 2, 3, 4]
    assert TimestepPolicy("uniform", count=3).select(50) == [0, 24, 49]
    assert TimestepPolicy("uniform", count=80).select(10) == list(range(10))
    assert TimestepPolicy("steps", steps=[7, 2, 2]).select(10) == [2, 7]
    normal = TimestepPolicy("normal", count=12, mean=0.5, std=0.1, seed=3).select(100)
    assert len(normal) == 12 and len(set(normal)) == 12
    assert 30 <= sum(normal) / 12 <= 70  # concentrated around the middle of the trajectory
    assert normal == TimestepPolicy("normal", count=12, mean=0.5, std=0.1, seed=3).select(100)


@pytest.mark.parametrize("kwargs,match", [({"kind": "log"}, "allowed"), ({"kind": "steps"}, "non-empty"),
                                          ({"kind": "uniform", "count": 0}, "count")])
def test_policy_errors(kwargs, match):
    with pytest.raises(diffpress.DiffpressError, match=match):
        TimestepPolicy(**kwargs)
    with pytest.raises(diffpress.DiffpressError, match="outside"):
        TimestepPolicy("steps", steps=[12]).select(10)


def test_collect_keeps_selected_steps_of_the_real_trajectory(tiny_unet):
    cs = collect(tiny_unet, num_samples=5, steps=8, policy=TimestepPolicy("steps", steps=[1, 6]), batch_size=3,
                 progress=False)
    assert len(cs) == 10 and cs.x.shape == (10, 1, 8, 8) and cs.cond is None
    ref = diffpress.sample(tiny_unet, num_samples=5, steps=8, seed=1000, record=True, progress=False).trajectory
    assert cs.timesteps == [float(ref.timesteps[1]), float(ref.timesteps[6])]
    assert torch.allclose(cs.x[:5], ref.latents[1], atol=1e-5)  # batches of 3 + 2 vs one batch of 5
    assert torch.allclose(cs.x[5:], ref.latents[6], atol=1e-5)
    assert cs.step.tolist() == [1] * 5 + [6] * 5


def test_collect_with_guidance_keeps_both_branches():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    den = Denoiser(dit.eval(), scheduler_config=training_scheduler())
    cs = collect(den, num_samples=4, steps=5, guidance=2.0, policy=TimestepPolicy("uniform", count=2), progress=False)
    assert len(cs) == 2 * 2 * 4
    assert cs.cond[:8].tolist() == [0, 1, 2, 3, 10, 10, 10, 10]  # labels, then the null label
    assert torch.equal(cs.x[:4], cs.x[4:8])  # the same x_t seen with cond and with the null label


def test_save_load_and_lazy_streaming(tiny_unet, tmp_path):
    cs = collect(tiny_unet, num_samples=6, steps=6, policy=TimestepPolicy("all"), progress=False)
    cs.save(tmp_path / "c.safetensors")
    eager = CalibrationSet.load(tmp_path / "c.safetensors")
    lazy = CalibrationSet.load(tmp_path / "c.safetensors", lazy=True)
    assert lazy.x is None and eager.meta["selected_steps"] == list(range(6))
    a, b = list(cs.batches(4)), list(lazy.batches(4))
    assert len(a) == len(b) == 12  # 6 steps x (4 + 2)
    for (xa, ta, _), (xb, tb, _) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and len(set(ta.tolist())) == 1
    with pytest.raises(diffpress.DiffpressError, match="force"):
        cs.save(tmp_path / "c.safetensors")


def test_load_errors(tmp_path):
    with pytest.raises(diffpress.DiffpressError, match="no calibration file"):
        CalibrationSet.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(diffpress.DiffpressError, match="corrupt"):
        CalibrationSet.load(bad)


def test_nan_calibration_data_is_rejected():
    x = torch.zeros(4, 1, 8, 8)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(diffpress.DiffpressError, match=r"NaN.*timesteps \[100.0\]"):
        CalibrationSet(x, torch.tensor([900.0, 900.0, 100.0, 100.0]), None, torch.tensor([0, 0, 1, 1]))


def test_observer_records_per_timestep_and_per_concat_part(tiny_unet):
    cs = collect(tiny_unet, num_samples=3, steps=4, policy=TimestepPolicy("all"), progress=False)
    stats = observe(tiny_unet, cs, {"model.conv_in": None, "model.up_blocks.0.resnets.0.conv1": 16},
                    outputs=True, progress=False)
    per_t = stats["model.conv_in"]["in"][0]
    assert sorted(per_t) == sorted(cs.timesteps)
    for t, st in per_t.items():
        xs = cs.x[cs.t == t]
        assert st.min == pytest.approx(float(xs.min())) and st.max == pytest.approx(float(xs.max()))
        assert st.count == xs.numel()
    conv_in = tiny_unet.get_submodule("model.conv_in")
    for t, st in stats["model.conv_in"]["out"][0].items():  # outputs are recorded before the bias
        out = conv_in(cs.x[cs.t == t]) - conv_in.bias.view(1, -1, 1, 1)
        assert st.max == pytest.approx(float(out.max()), abs=1e-5)
    split = stats["model.up_blocks.0.resnets.0.conv1"]
    assert len(split["in"]) == len(split["out"]) == 2  # the two halves of the skip-concat
