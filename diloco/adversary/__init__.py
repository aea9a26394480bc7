"""Byzantine robustness: robust aggregators, attacks on payload rows, and payload validation.

``build_aggregator(name, **kwargs)`` and ``build_attack(name, **kwargs)`` build from registry
names; :func:`validate_payloads` screens untrusted per-worker payloads before aggregation.
"""

from diloco.adversary.aggregators import (
    AGGREGATORS,
    NNM,
    Aggregator,
    Bucketing,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    TrimmedMean,
    build_aggregator,
)
from diloco.adversary.attacks import (
    ALIE,
    ATTACKS,
    IPM,
    Attack,
    FreeRider,
    Gaussian,
    Malformed,
    Mimic,
    MinMax,
    NoAttack,
    SignFlip,
    Stale,
    build_attack,
)
from diloco.adversary.validate import validate_payloads

__all__ = [
    "AGGREGATORS",
    "ALIE",
    "ATTACKS",
    "IPM",
    "NNM",
    "Aggregator",
    "Attack",
    "Bucketing",
    "CenteredClipping",
    "CoordinateMedian",
    "FreeRider",
    "Gaussian",
    "GeometricMedian",
    "Krum",
    "Malformed",
    "Mean",
    "Mimic",
    "MinMax",
    "MultiKrum",
    "NoAttack",
    "SignFlip",
    "Stale",
    "TrimmedMean",
    "build_aggregator",
    "build_attack",
    "validate_payloads",
]
