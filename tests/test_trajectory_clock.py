"""Method schedules by trajectory fraction (ldm/guidance.py TrajectoryClock): a per-step setting written for the
steps of a reference DDIM run (a preset's ``steps``) acts on the same part of the noise trajectory at any step count;
a DDIM run of the reference's own step count sees its own step indices (so its images are bitwise what they were)."""
import pytest
import torch

from ldm.guidance import TrajectoryClock, reference_timesteps


def ddim_timesteps(steps, T=1000):
    """DDIM's uniform spacing written out independently: c = T // S, t = i*c + 1 for i*c < T, those below T (the
    original's schedule without the entries past its end), in sampling order."""
    c = T // steps
    return [t for t in (i * c + 1 for i in range(0, -(-T // c))) if t < T][::-1]


@pytest.mark.parametrize("steps", [1, 4, 20, 25, 50, 1000])
def test_reference_timesteps_are_ddim_uniform(steps):
    assert reference_timesteps(1000, steps) == ddim_timesteps(steps)


@pytest.mark.parametrize("steps", [4, 20, 25, 50])
def test_a_run_of_the_reference_step_count_keeps_its_step_indices(steps):
    clock = TrajectoryClock(ddim_timesteps(steps))
    times = ddim_timesteps(steps)
    assert [clock.step_of(torch.tensor([t])) for t in times] == list(range(steps))
    assert [clock.run_step_of(r, times) for r in range(steps)] == list(range(steps))


def test_a_fifty_step_preset_at_25_steps_keeps_its_fraction():
    """ScaleCrafter's SD presets re-dilate for steps < 20 of 50 (40 %): at 25 DDIM steps, t_k = 961 - 40k is the
    timestep of the 50-step reference's step 2k + 1, so steps k < 10 (40 % again) are re-dilated."""
    clock = TrajectoryClock(ddim_timesteps(50))
    run = ddim_timesteps(25)
    ref_steps = [clock.step_of(t) for t in run]
    assert ref_steps == [2 * k + 1 for k in range(25)]
    assert sum(1 for r in ref_steps if r < 20) == 10
    assert clock.run_step_of(15, run) == 7  # FreeScale's restart at 15 of 50 (30 %): step 7 of 25, both t = 681


def test_continuous_timesteps_and_a_second_order_call():
    """A sampler on Karras sigmas passes non-integer timesteps; each call is placed by its own t (a Heun step's
    second call, at the next sigma, may already count as the next reference step)."""
    clock = TrajectoryClock(ddim_timesteps(50))  # 981, 961, ..., 1
    assert clock.step_of(torch.tensor([999.3])) == 0
    assert clock.step_of(torch.tensor([961.0])) == 1 and clock.step_of(torch.tensor([960.9])) == 2
    assert clock.step_of(torch.tensor([0.2])) == 50


def test_wrapped_guidance_receives_reference_steps():
    seen = []

    def guidance(model, x, t, cond, uncond, scale, step):
        seen.append(step)
        return x
    clock = TrajectoryClock(ddim_timesteps(50))
    wrapped = clock.wrap(guidance)
    for k, t in enumerate(ddim_timesteps(10)):  # t = 901 - 100k: reference step 5k + 4 (t = 981 - 20 i)
        wrapped(None, torch.zeros(1), torch.tensor([t]), None, None, 1.0, k)
    assert seen == [5 * k + 4 for k in range(10)]
    assert clock.wrap(None) is None  # plain guidance stays the sampler's default
