"""A modality is data: its name and a `ModalitySpec` (missing-value fill, load transform,
value domain). The paper's three are built-in specs; any other name gets `DEFAULT` (values
as given, finite where present, missing → 0) unless a spec file sets it. `prepare` records
each modality's spec and order in the manifest, so a dataset describes itself; everything
downstream takes the modalities from the dataset or the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from morpheus_jax.core.errors import ConfigError
from morpheus_jax.core.names import MODALITIES

# name → (function, the smallest input it is defined for, exclusive)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float | None]] = {
    "identity": (lambda x: x, None),
    "log10(cn/2+1)": (lambda x: np.log10(x / 2.0 + 1.0), -2.0),
    "log2(x+1)": (lambda x: np.log2(x + 1.0), -1.0),
    "log1p": (np.log1p, -1.0),
}


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    fill: float = 0.0                     # a missing value (before the transform)
    transform: str = "identity"           # one of TRANSFORMS
    min: float | None = None              # the value domain, inclusive (None: unbounded)
    max: float | None = None
    value: str = "value"                  # what one value is called in messages

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform {self.transform!r}: expected one of {', '.join(TRANSFORMS)}")
        for key in ("fill", "min", "max"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{key}: expected a finite number, got {v!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError(f"min {self.min} is above max {self.max}")
        if not self.admits(np.array([self.fill], np.float64)).all():
            raise ConfigError(f"fill {self.fill} is outside the value domain {self.domain()}")

    def domain(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"

    def admits(self, values: np.ndarray) -> np.ndarray:
        """Which (finite) values lie in the domain and the transform's."""
        ok = np.ones(values.shape, bool)
        if self.min is not None:
            ok &= values >= self.min
        if self.max is not None:
            ok &= values <= self.max
        lowest = TRANSFORMS[self.transform][1]
        if lowest is not None:
            ok &= values > lowest
        return ok

    def problem(self, v: float) -> str:
        """Why ``v`` is refused, in the modality's words."""
        if self.min == 0 and self.max is None and v < 0:
            return f"negative {self.value} {v:.4g}"
        return f"{self.value} {v:.4g} outside {self.domain()}" + (
            f" (or where {self.transform} is undefined)" if TRANSFORMS[self.transform][1] is not None else "")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Missing → fill, then the transform."""
        return TRANSFORMS[self.transform][0](np.where(np.isnan(values), self.fill, values))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ModalitySpec":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of fill / transform / min / max / value")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected fill, transform, min, max, value)")
        try:
            return cls(**dict(data))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


BUILTIN: dict[str, ModalitySpec] = {
    "rna": ModalitySpec(value="expression value"),
    "dnam": ModalitySpec(min=0.0, max=1.0, value="beta value"),
    "cnv": ModalitySpec(fill=2.0, transform="log10(cn/2+1)", min=0.0, value="copy number"),
}
DEFAULT = ModalitySpec()


def spec_for(name: str, given: Mapping[str, ModalitySpec] | None = None) -> tuple[ModalitySpec, bool]:
    """(the spec of ``name``, whether it is the default one): given, else built in, else DEFAULT."""
    if given and name in given:
        return given[name], False
    if name in BUILTIN:
        return BUILTIN[name], False
    return DEFAULT, True


def ordered(names) -> list[str]:
    """The model's modality order: the paper's (rna, dnam, cnv) first, then the others as given."""
    names = list(dict.fromkeys(names))
    return [m for m in MODALITIES if m in names] + [m for m in names if m not in MODALITIES]


def check_name(name: str, where: str) -> str:
    """A modality name: letters, digits and underscores, not starting with a digit (it names
    files, parameters and metrics columns such as ``loss_<name>``)."""
    if not isinstance(name, str) or not name.isidentifier() or name.lower() == "wsi":
        raise ConfigError(f"{where}: modality name {name!r}: expected letters, digits and underscores "
                          "(not starting with a digit, not 'wsi')")
    return name


def read_spec_file(path: str | Path) -> dict[str, ModalitySpec]:
    """A YAML file ``{name: {fill, transform, min, max, value}}`` (every key optional)."""
    import yaml  # lazy: start-up time

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the modality spec file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path}: expected a mapping {{modality: {{fill, transform, min, max, value}}}}")
    return {check_name(str(m), str(path)): ModalitySpec.from_json(v or {}, f"{path}: {m}") for m, v in data.items()}
