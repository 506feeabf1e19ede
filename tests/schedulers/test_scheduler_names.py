from __future__ import annotations

import pytest
import torch

import schedulers
from schedulers.names import SchedulerSpec, UnknownScheduler, public_names, resolve
from schedulers.samplers import SAMPLERS
from schedulers.sigmas import SCHEDULES


def test_every_public_name_runs_an_implemented_sampler_and_schedule() -> None:
    for name in public_names():
        spec = resolve(name)
        assert spec.sampler in SAMPLERS, name
        assert spec.schedule in SCHEDULES, name


def test_public_names_are_unique() -> None:
    names = public_names()
    assert len(names) == len(set(names))


def test_comfyui_tokens_run_on_sgm_uniform_and_win_over_case_folded_labels() -> None:
    # docs/contract.md §6: a ComfyUI sampler token runs on sgm_uniform; the DDIM label on ddim_uniform.
    assert resolve("ddim") == SchedulerSpec("ddim", "ddim", "sgm_uniform")
    assert resolve("Ddim") == resolve("DDIM") == SchedulerSpec("DDIM", "ddim", "ddim_uniform")
    for token in ("euler", "heun", "lms", "dpmpp_2m", "dpm_2"):
        assert resolve(token).schedule == "sgm_uniform"


def test_default_and_plain_labels_use_sgm_uniform_karras_labels_karras_and_ddim_its_own() -> None:
    assert resolve("DPM++ 2M") == SchedulerSpec("DPM++ 2M", "dpmpp_2m", "sgm_uniform")
    assert resolve("DPM++ 2M Karras").schedule == "karras"
    assert resolve("Euler") == SchedulerSpec("Euler", "euler", "sgm_uniform")
    assert resolve("Heun").sampler == "heun"
    assert resolve("DDIM") == SchedulerSpec("DDIM", "ddim", "ddim_uniform")


@pytest.mark.parametrize(
    ("name", "sampler", "schedule"),
    [
        ("DPM++ 2M SDE", "dpmpp_2m_sde", "sgm_uniform"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
        ("DPM++ 2S a", "dpmpp_2s_ancestral", "sgm_uniform"),
        ("Euler a", "euler_ancestral", "sgm_uniform"),
        ("DPM2", "dpm_2", "sgm_uniform"),
        ("DPM2 Karras", "dpm_2", "karras"),
        ("DPM2 a", "dpm_2_ancestral", "sgm_uniform"),
        ("LMS", "lms", "sgm_uniform"),
        ("LMS Karras", "lms", "karras"),
        ("DPM++ SDE", "dpmpp_sde", "sgm_uniform"),
        ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
        ("DPM++ 3M SDE", "dpmpp_3m_sde", "sgm_uniform"),
        ("UniPC", "uni_pc", "sgm_uniform"),
        ("DEIS", "deis", "sgm_uniform"),
    ],
)
def test_contract_labels_map_to_their_comfyui_sampler_and_schedule(
    name: str, sampler: str, schedule: str
) -> None:
    assert (resolve(name).sampler, resolve(name).schedule) == (sampler, schedule)


@pytest.mark.parametrize(
    "token",
    [
        *(
            "dpmpp_2m",
            "dpmpp_2m_sde",
            "dpmpp_2s_ancestral",
            "euler_ancestral",
            "dpm_2",
            "dpm_2_ancestral",
            "lms",
        ),
        *("dpmpp_sde", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2", "deis"),
    ],
)
def test_comfyui_sampler_tokens_run_that_sampler_on_sgm_uniform(token: str) -> None:
    assert (resolve(token).sampler, resolve(token).schedule) == (token, "sgm_uniform")


def test_legacy_labels_resolve() -> None:
    assert (resolve("DPM Multi").sampler, resolve("DPM Multi").schedule) == ("dpmpp_2m", "sgm_uniform")
    assert resolve("euler_a").sampler == "euler_ancestral"
    # diffusers' single-step DPM-Solver++ has no deterministic twin in ComfyUI: its nearest, DPM-Solver++(2S).
    single = resolve("DPM Single")
    assert (single.sampler, single.schedule) == ("dpmpp_2s_ancestral", "sgm_uniform")


def test_names_match_case_insensitively() -> None:
    assert resolve("dpm++ 2m karras") == resolve("DPM++ 2M Karras")
    assert resolve("EULER") == resolve("Euler")
    same = resolve("euler")
    assert (same.sampler, same.schedule) == (resolve("Euler").sampler, resolve("Euler").schedule)


def test_unknown_name_raises_a_value_error_listing_the_accepted_names() -> None:
    with pytest.raises(UnknownScheduler) as raised:
        resolve("PNDM")
    assert isinstance(raised.value, ValueError)
    for name in public_names():
        assert name in str(raised.value)


@pytest.mark.parametrize("name", ["UniPC Karras", "euler_ancestral_cfg", "pndm", ""])
def test_names_without_an_implementation_are_rejected(name: str) -> None:
    with pytest.raises(UnknownScheduler):
        resolve(name)


NEW_NAMES = [
    *("DPM++ SDE", "DPM++ SDE Karras", "DPM++ 3M SDE", "UniPC", "DEIS"),
    *("dpmpp_sde", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2", "deis", "unipc", "Deis"),
]


@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_names_resolve_and_run_on_their_schedule(name: str) -> None:
    spec = resolve(name)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 5):
        sigmas = schedulers.sigmas_for(spec.schedule, steps, sampler=spec.sampler)
        out = schedulers.sample(spec.sampler, lambda x, sigma: 0.5 * x, sigmas[0] * x, sigmas, seed=4)
        assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


ISSUE_15_TOKENS = [
    *("euler_cfg_pp", "euler_ancestral_cfg_pp", "heunpp2", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde_gpu"),
    *("dpmpp_2m_cfg_pp", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
    "dpmpp_3m_sde_gpu",
    *("ddpm", "lcm", "ipndm", "ipndm_v", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral"),
    *("res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde"),
    *("seeds_2", "seeds_3", "dpm_fast", "dpm_adaptive", "sa_solver", "sa_solver_pece"),
]


@pytest.mark.parametrize("token", ISSUE_15_TOKENS)
def test_every_new_comfyui_token_runs_that_sampler_on_sgm_uniform(token: str) -> None:
    assert resolve(token) == SchedulerSpec(token, token, "sgm_uniform")


def test_every_implemented_sampler_has_its_own_token() -> None:
    tokens = {spec.sampler for spec in map(resolve, public_names()) if spec.label == spec.sampler}
    assert tokens == set(SAMPLERS)


def test_pp_spellings_are_the_plain_samplers_at_twice_the_guidance() -> None:
    assert resolve("euler_pp") == SchedulerSpec("euler_pp", "euler", "sgm_uniform", guidance_factor=2.0)
    spec = resolve("Euler_Ancestral_PP")
    assert (spec.sampler, spec.guidance_factor) == ("euler_ancestral", 2.0)
    assert all(resolve(name).guidance_factor == 1.0 for name in public_names() if not name.endswith("_pp"))


def test_page_typos_resolve_to_the_sampler_they_mean() -> None:
    assert resolve("euler_ancestra").sampler == "euler_ancestral"
    assert resolve("leuler_ancestral_cfg_pp").sampler == "euler_ancestral_cfg_pp"


@pytest.mark.parametrize("name", [*ISSUE_15_TOKENS, "euler_pp", "euler_ancestral_pp"])
def test_issue_15_names_run_through_the_public_entry_points(name: str) -> None:
    spec = resolve(name)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 5):
        sigmas = schedulers.sigmas_for(spec.schedule, steps, sampler=spec.sampler)
        out = schedulers.sample(spec.sampler, lambda x, sigma: 0.5 * x, sigmas[0] * x, sigmas, seed=4)
        assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
