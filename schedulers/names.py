"""Public scheduler names (A1111/Segmind labels, ComfyUI sampler tokens, legacy labels) → the ComfyUI
sampler and sigma schedule they run.

The hosted service's own table is unknown; plain labels are assumed to use `sgm_uniform` (the official SD3
workflow's schedule), "… Karras" labels `karras`, and "DDIM" `ddim_uniform`. Only names whose sampler and
schedule are implemented are listed, so every accepted name can run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerSpec:
    label: str
    sampler: str
    schedule: str
    guidance_factor: float = 1.0
    """The request's guidance is multiplied by this: 2 for the short-lived `_pp` spellings, which ComfyUI
    migrated to the plain sampler at twice the cfg (docs/sampling.md §10)."""


class UnknownScheduler(ValueError):
    """A scheduler name that is not in the table; the message lists the accepted names."""


_TABLE: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("DPM++ 2M", "dpmpp_2m", "sgm_uniform"),
    SchedulerSpec("DPM++ 2M Karras", "dpmpp_2m", "karras"),
    SchedulerSpec("DPM++ 2M SDE", "dpmpp_2m_sde", "sgm_uniform"),
    SchedulerSpec("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    SchedulerSpec("DPM++ 2S a", "dpmpp_2s_ancestral", "sgm_uniform"),
    SchedulerSpec("Euler", "euler", "sgm_uniform"),
    SchedulerSpec("Euler a", "euler_ancestral", "sgm_uniform"),
    SchedulerSpec("Heun", "heun", "sgm_uniform"),
    SchedulerSpec("DPM2", "dpm_2", "sgm_uniform"),
    SchedulerSpec("DPM2 Karras", "dpm_2", "karras"),
    SchedulerSpec("DPM2 a", "dpm_2_ancestral", "sgm_uniform"),
    SchedulerSpec("LMS", "lms", "sgm_uniform"),
    SchedulerSpec("LMS Karras", "lms", "karras"),
    SchedulerSpec("DDIM", "ddim", "ddim_uniform"),
    SchedulerSpec("DPM++ SDE", "dpmpp_sde", "sgm_uniform"),
    SchedulerSpec("DPM++ SDE Karras", "dpmpp_sde", "karras"),
    SchedulerSpec("DPM++ 3M SDE", "dpmpp_3m_sde", "sgm_uniform"),
    SchedulerSpec("UniPC", "uni_pc", "sgm_uniform"),
    SchedulerSpec("DEIS", "deis", "sgm_uniform"),
    # ComfyUI sampler tokens, each on the workflow's sgm_uniform schedule (docs/contract.md §6). They are
    # matched exactly before the labels above are matched case-insensitively, so the token "ddim" is
    # euler on sgm_uniform while "DDIM" (or "Ddim") is the label on ddim_uniform.
    SchedulerSpec("euler", "euler", "sgm_uniform"),
    SchedulerSpec("heun", "heun", "sgm_uniform"),
    SchedulerSpec("lms", "lms", "sgm_uniform"),
    SchedulerSpec("ddim", "ddim", "sgm_uniform"),
    SchedulerSpec("dpmpp_2m", "dpmpp_2m", "sgm_uniform"),
    SchedulerSpec("dpmpp_2m_sde", "dpmpp_2m_sde", "sgm_uniform"),
    SchedulerSpec("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", "sgm_uniform"),
    SchedulerSpec("euler_ancestral", "euler_ancestral", "sgm_uniform"),
    SchedulerSpec("dpm_2", "dpm_2", "sgm_uniform"),
    SchedulerSpec("dpm_2_ancestral", "dpm_2_ancestral", "sgm_uniform"),
    SchedulerSpec("dpmpp_sde", "dpmpp_sde", "sgm_uniform"),
    SchedulerSpec("dpmpp_3m_sde", "dpmpp_3m_sde", "sgm_uniform"),
    SchedulerSpec("uni_pc", "uni_pc", "sgm_uniform"),
    SchedulerSpec("uni_pc_bh2", "uni_pc_bh2", "sgm_uniform"),
    SchedulerSpec("deis", "deis", "sgm_uniform"),
    # The rest of ComfyUI's sampler tokens (issue 15), on the same schedule.
    *(
        SchedulerSpec(token, token, "sgm_uniform")
        for token in (
            *("euler_cfg_pp", "euler_ancestral_cfg_pp", "heunpp2", "dpmpp_2s_ancestral_cfg_pp"),
            *("dpmpp_sde_gpu", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun"),
            *("dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v"),
            *("res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral"),
            *("res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp"),
            *("er_sde", "seeds_2", "seeds_3", "dpm_fast", "dpm_adaptive", "sa_solver", "sa_solver_pece"),
        )
    ),
    # Spellings of the hosted pages (docs/contract.md §6, docs/sampling.md §10): the `_pp` samplers
    # ComfyUI had for a few days in 2024-06 step with d = (x − 2D + D_u)/σ, which is exactly euler /
    # euler_ancestral at twice the guidance, as ComfyUI migrated them; and two typos of a page's
    # sampler list.
    SchedulerSpec("euler_pp", "euler", "sgm_uniform", guidance_factor=2.0),
    SchedulerSpec("euler_ancestral_pp", "euler_ancestral", "sgm_uniform", guidance_factor=2.0),
    SchedulerSpec("euler_ancestra", "euler_ancestral", "sgm_uniform"),
    SchedulerSpec("leuler_ancestral_cfg_pp", "euler_ancestral_cfg_pp", "sgm_uniform"),
    # Legacy labels of the hosted service's older models, named after diffusers' schedulers. "DPM Single"
    # is diffusers' single-step DPM-Solver++ (second order by default); ComfyUI has no deterministic
    # single-step DPM-Solver++, and its nearest sampler is DPM-Solver++(2S) with ancestral noise
    # (README.md, "Schedulers").
    SchedulerSpec("DPM Multi", "dpmpp_2m", "sgm_uniform"),
    SchedulerSpec("DPM Single", "dpmpp_2s_ancestral", "sgm_uniform"),
    SchedulerSpec("euler_a", "euler_ancestral", "sgm_uniform"),
)

_EXACT: dict[str, SchedulerSpec] = {spec.label: spec for spec in _TABLE}
# First spelling wins under case folding: the labels come before the tokens in the table.
_FOLDED: dict[str, SchedulerSpec] = {}
for _spec in _TABLE:
    _FOLDED.setdefault(_spec.label.casefold(), _spec)


def public_names() -> list[str]:
    """Every accepted name in its canonical spelling, in table order."""
    return [spec.label for spec in _TABLE]


def resolve(name: str) -> SchedulerSpec:
    """The sampler and schedule for a public name: an exact match first, then case-insensitively."""
    spec = _EXACT.get(name) or _FOLDED.get(name.casefold())
    if spec is None:
        raise UnknownScheduler(f"unknown scheduler {name!r}; accepted: {', '.join(public_names())}")
    return spec
