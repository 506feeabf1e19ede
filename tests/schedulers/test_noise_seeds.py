from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from schedulers.noise import AncestralNoise, BrownianTreeNoise, initial_noise
from schedulers.samplers import noise_for


def test_initial_noise_is_one_float32_cpu_draw_of_the_whole_batch() -> None:
    shape = (2, 16, 8, 12)
    expected = torch.randn(shape, dtype=torch.float32, generator=torch.Generator("cpu").manual_seed(42))
    noise = initial_noise(42, shape)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)


def test_first_batch_item_is_the_single_image_and_the_second_is_not_seed_plus_one() -> None:
    batch = initial_noise(1234, (4, 16, 8, 8))
    assert torch.equal(batch[0], initial_noise(1234, (1, 16, 8, 8))[0])
    assert not torch.equal(batch[1], initial_noise(1235, (1, 16, 8, 8))[0])


def test_seeds_up_to_the_api_maximum_are_accepted() -> None:
    assert initial_noise(999_999_999_999_999, (1, 4)).shape == (1, 4)


def test_ancestral_noise_on_cpu_is_the_sequential_stream_of_seed_plus_one() -> None:
    like = torch.zeros(3, 4, 5, 5)
    source = AncestralNoise(77)
    generator = torch.Generator("cpu").manual_seed(78)
    for sigma, sigma_next in ((1.0, 0.8), (0.8, 0.5), (0.5, 0.2)):
        drawn = source(sigma, sigma_next, like)
        assert drawn.dtype == torch.float32 and drawn.shape == like.shape
        assert torch.equal(drawn, torch.randn(like.shape, dtype=torch.float32, generator=generator))


def test_ancestral_noise_sources_do_not_share_state() -> None:
    like = torch.zeros(1, 4, 2, 2)
    first, second = AncestralNoise(5), AncestralNoise(5)
    assert torch.equal(first(1.0, 0.5, like), second(1.0, 0.5, like))


def test_brownian_noise_is_the_scaled_increment_of_one_seeded_torchsde_tree() -> None:
    import torchsde  # a dependency of the project: a missing one must fail, not skip

    like = torch.zeros(2, 4, 3, 3)
    sigmas = [1.0, 0.8, 0.55, 0.3, 0.1]
    source = BrownianTreeNoise(21, sigma_min=0.1, sigma_max=1.0, like=like)
    tree = torchsde.BrownianTree(torch.tensor(0.1), torch.zeros(2, 4, 3, 3), torch.tensor(1.0), entropy=21)
    for sigma, sigma_next in pairwise(sigmas):
        drawn = source(sigma, sigma_next, like)
        low, high = torch.tensor(sigma_next), torch.tensor(sigma)
        expected = -tree(low, high) / (high - low).sqrt()  # W(σ_next) − W(σ), with σ_next < σ
        assert drawn.dtype == torch.float32 and drawn.shape == like.shape
        torch.testing.assert_close(drawn, expected, atol=0, rtol=0)


def test_brownian_noise_does_not_depend_on_query_order_and_has_unit_scale() -> None:
    like = torch.zeros(64, 4, 8, 8)
    forward = BrownianTreeNoise(3, sigma_min=0.05, sigma_max=1.0, like=like)
    backward = BrownianTreeNoise(3, sigma_min=0.05, sigma_max=1.0, like=like)
    late = backward(0.3, 0.05, like)
    early = backward(1.0, 0.3, like)
    torch.testing.assert_close(forward(1.0, 0.3, like), early)
    torch.testing.assert_close(forward(0.3, 0.05, like), late)
    assert abs(early.std().item() - 1.0) < 0.05


def test_noise_for_gives_each_sampler_its_noise_kind() -> None:
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    like = torch.zeros(1, 4, 2, 2)
    for sampler in ("euler", "ddim", "heun", "dpmpp_2m", "dpm_2", "lms"):
        assert noise_for(sampler, seed=1, sigmas=sigmas, like=like) is None
    for sampler in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"):
        assert isinstance(noise_for(sampler, seed=1, sigmas=sigmas, like=like), AncestralNoise)
    for sampler in ("uni_pc", "uni_pc_bh2", "deis"):
        assert noise_for(sampler, seed=1, sigmas=sigmas, like=like) is None
    for sampler in ("dpmpp_2m_sde", "dpmpp_sde", "dpmpp_3m_sde"):
        brownian = noise_for(sampler, seed=1, sigmas=sigmas, like=like)
        assert isinstance(brownian, BrownianTreeNoise)
        # The tree spans the schedule's own extremes, before the sampler moves a first sigma of 1.
        assert (brownian.sigma_min, brownian.sigma_max) == (pytest.approx(0.2), 1.0)
    with pytest.raises(ValueError):
        noise_for("pndm", seed=1, sigmas=sigmas, like=like)


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_gpu_sde_samplers_build_their_tree_on_the_state_device(sampler: str) -> None:
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    like = torch.zeros(2, 4, 3, 3)
    cpu = noise_for(sampler, seed=9, sigmas=sigmas, like=like)
    on_device = noise_for(f"{sampler}_gpu", seed=9, sigmas=sigmas, like=like)
    assert isinstance(cpu, BrownianTreeNoise) and isinstance(on_device, BrownianTreeNoise)
    assert cpu.device.type == "cpu" and on_device.device == like.device
    # On a CPU state the device tree is the CPU tree: the same increments.
    for sigma, sigma_next in pairwise([1.0, 0.6, 0.2]):
        assert torch.equal(cpu(sigma, sigma_next, like), on_device(sigma, sigma_next, like))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sde_tree_lives_on_cuda_and_returns_float32_there() -> None:
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0], device="cuda")
    like = torch.zeros(1, 4, 3, 3, device="cuda")
    noise = noise_for("dpmpp_2m_sde_gpu", seed=9, sigmas=sigmas, like=like)
    assert isinstance(noise, BrownianTreeNoise) and noise.device.type == "cuda"
    draw = noise(1.0, 0.6, like)
    assert draw.device.type == "cuda" and draw.dtype == torch.float32
    assert 0.3 < float(draw.std()) < 3.0
