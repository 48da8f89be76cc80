"""The ``loss:`` config section (``LossConfig``) and the loss-type name sets.

Pure Python + torch-free: imported by ``training/config.py`` for the cross-section checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_prefix.config import require

# TRL 1.x DPOTrainer loss types (losses/trl.py); the first four predate this module.
TRL_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
DPO_TYPES = TRL_TYPES + ("dpo_pl",)
REF_FREE_TYPES = ("simpo", "orpo")
REWARD_TYPES = ("bt", "rm_pl")
LISTWISE_TYPES = ("dpo_pl", "rm_pl")
ALL_TYPES = DPO_TYPES + REF_FREE_TYPES + REWARD_TYPES
NO_REFERENCE = REF_FREE_TYPES + ("sft",)  # loss types that read no reference log-probs
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SMOOTHED = ("sigmoid", "robust", "simpo", "exo_pair", "aot", "aot_unpaired")  # read label_smoothing
AOT_TYPES = ("aot", "aot_unpaired")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LossConfig:
    """The ``loss:`` section. Names follow TRL (DPOConfig, CPOConfig, ORPOConfig, RewardConfig).

    - ``type``: a loss name, or a list of TRL loss types (TRL ``loss_type`` as a list: an MPO-style mix).
    - ``weights``: one weight per listed type (TRL ``loss_weights``; default 1.0 each).
    - ``beta``: DPO/IPO/SimPO temperature; for ``orpo`` it is ORPO's lambda (TRL ``ORPOConfig.beta``).
      Unused by ``bt`` / ``rm_pl``.
    - ``label_smoothing``: conservative DPO (``sigmoid``), ``robust``, ``simpo``, ``aot``,
      ``aot_unpaired`` and EXO's epsilon (``exo_pair``, must be > 0); in [0, 0.5).
    - ``f_divergence``: TRL ``f_divergence_type``: reverse_kl, forward_kl, js_divergence or
      alpha_divergence (TRL DPO types only).
    - ``f_alpha_divergence_coef``: the alpha of ``alpha_divergence`` (default 0.5, as TRL).
    - ``discopop_tau``: DiscoPOP's temperature (TRL default 0.05).
    - ``use_weighting``: WPO weights ``w_c * w_r`` on every per-pair loss (TRL ``use_weighting``).
    - ``ld_alpha``: LD-DPO's weight of the tokens past the pair's shared length (TRL ``ld_alpha``).
    - ``rpo_alpha``: weight of the chosen-response NLL added to any DPO-family loss (TRL < 1.0 DPOConfig).
    - ``simpo_gamma``: TRL CPOConfig's SimPO target margin (absolute, not the gamma/beta ratio).
    - ``cpo_alpha``: TRL CPOConfig's NLL weight, used with ``simpo`` (default 0 here = pure SimPO).
    - ``margin``: ``bt`` only: ``None``, ``"scores"`` (score_chosen - score_rejected) or a constant.
    - ``center_rewards_coefficient``: TRL RewardConfig's centering weight (``bt``, ``rm_pl``).
    - ``pairs``: ``"all"`` or ``"best_worst"`` (pairwise types; listwise types always use ``"all"``).
    """

    type: str | list[str] = "sigmoid"
    weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    ld_alpha: float | None = None
    rpo_alpha: float | None = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    margin: float | str | None = None
    center_rewards_coefficient: float | None = None
    pairs: str = "all"

    @property
    def types(self) -> tuple[str, ...]:
        """``type`` as a tuple (one entry for a single name)."""
        return tuple(self.type) if isinstance(self.type, (list, tuple)) else (self.type,)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """One weight per entry of ``types``."""
        return tuple(float(w) for w in self.weights) if self.weights is not None else (1.0,) * len(self.types)

    @property
    def is_trl(self) -> bool:
        """Every type is a TRL DPOTrainer type (computed by ``losses/trl.py``)."""
        return all(t in TRL_TYPES for t in self.types)

    @property
    def name(self) -> str:
        """The single type, or ``"mix"`` for several."""
        return self.types[0] if len(self.types) == 1 else "mix"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending ``loss.*`` field."""
        types = self.types
        require(
            len(types) >= 1 and all(isinstance(x, str) and x in ALL_TYPES for x in types),
            "loss.type", f"must be one of {sorted(ALL_TYPES)} or a list of TRL types {list(TRL_TYPES)}, "
            f"got {self.type!r}",
        )  # fmt: skip
        require(
            len(types) == 1 or self.is_trl, "loss.type",
            f"a list mixes TRL DPO loss types only ({list(TRL_TYPES)}), got {list(types)}",
        )  # fmt: skip
        if self.weights is not None:
            w = self.weights
            require(
                isinstance(w, (list, tuple)) and all(_is_number(x) for x in w), "loss.weights",
                f"must be a list of numbers, got {w!r}",
            )  # fmt: skip
            n = len(w) if isinstance(w, (list, tuple)) else len(types)  # (a non-list was reported just above)
            require(n == len(types), "loss.weights", f"needs one weight per loss.type entry ({len(types)}), got {n}")
        t = self.name
        require(_is_number(self.beta) and self.beta > 0, "loss.beta", f"must be a positive number, got {self.beta!r}")
        ls = self.label_smoothing
        require(_is_number(ls) and 0 <= ls < 0.5, "loss.label_smoothing", f"must be in [0, 0.5), got {ls!r}")
        require(
            ls == 0 or any(x in SMOOTHED for x in types), "loss.label_smoothing",
            f"is only used by {SMOOTHED}, not {t!r}; set it to 0",
        )  # fmt: skip
        require(
            (_is_number(ls) and ls > 0) or "exo_pair" not in types, "loss.label_smoothing",
            "exo_pair needs label_smoothing > 0 (EXO's epsilon; the paper uses 1e-3)",
        )  # fmt: skip
        self._validate_trl_options()
        if self.rpo_alpha is not None:
            a = self.rpo_alpha
            require(_is_number(a) and a >= 0, "loss.rpo_alpha", f"must be null or >= 0, got {a!r}")
            require(all(x in DPO_TYPES for x in types), "loss.rpo_alpha",
                    f"applies to the DPO family {DPO_TYPES}, not {t!r}")  # fmt: skip
        require(_is_number(self.simpo_gamma), "loss.simpo_gamma", f"must be a number, got {self.simpo_gamma!r}")
        c = self.cpo_alpha
        require(_is_number(c) and c >= 0, "loss.cpo_alpha", f"must be >= 0, got {c!r}")
        require(c == 0 or t == "simpo", "loss.cpo_alpha", f"is only used by simpo, not {t!r}; set it to 0")
        m = self.margin
        require(m is None or m == "scores" or _is_number(m), "loss.margin",
                f"must be null, 'scores' or a number, got {m!r}")  # fmt: skip
        require(m is None or t == "bt", "loss.margin", f"is only used by bt, not {t!r}")
        cr = self.center_rewards_coefficient
        if cr is not None:
            require(_is_number(cr) and cr >= 0, "loss.center_rewards_coefficient", f"must be null or >= 0, got {cr!r}")
            require(t in REWARD_TYPES, "loss.center_rewards_coefficient", f"applies to {REWARD_TYPES}, not {t!r}")
        require(self.pairs in ("all", "best_worst"), "loss.pairs",
                f"must be one of ('all', 'best_worst'), got {self.pairs!r}")  # fmt: skip
        require(self.pairs == "all" or t not in LISTWISE_TYPES, "loss.pairs",
                f"listwise type {t!r} ranks whole units; use pairs='all'")  # fmt: skip

    def _validate_trl_options(self) -> None:
        types, trl = self.types, self.is_trl
        fd = self.f_divergence
        require(fd in F_DIVERGENCES, "loss.f_divergence", f"must be one of {F_DIVERGENCES}, got {fd!r}")
        require(fd == "reverse_kl" or trl, "loss.f_divergence", f"applies to the TRL DPO types, not {self.name!r}")
        a = self.f_alpha_divergence_coef
        require(_is_number(a), "loss.f_alpha_divergence_coef", f"must be a number, got {a!r}")
        tau = self.discopop_tau
        require(_is_number(tau) and tau > 0, "loss.discopop_tau", f"must be a positive number, got {tau!r}")
        require(isinstance(self.use_weighting, bool), "loss.use_weighting", f"must be true or false, got "
                f"{self.use_weighting!r}")  # fmt: skip
        if self.use_weighting:
            require(trl, "loss.use_weighting", f"applies to the TRL DPO types, not {self.name!r}")
            require(not any(x in AOT_TYPES for x in types), "loss.use_weighting",
                    "aot / aot_unpaired sort pairs across the batch, which misaligns per-pair weights (as TRL)")
            require("sft" not in types, "loss.use_weighting",
                    "sft is a token mean over the whole batch; its WPO weight would need the global weight "
                    "sum before the backward pass: drop sft from the mix or use_weighting")  # fmt: skip
        ld = self.ld_alpha
        if ld is not None:
            require(_is_number(ld) and 0 <= ld <= 1, "loss.ld_alpha", f"must be null or in [0, 1], got {ld!r}")
            require(trl, "loss.ld_alpha", f"applies to the TRL DPO types, not {self.name!r}")
