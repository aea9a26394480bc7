"""The exchange between an algorithm's local and apply phases.

Codec (``conf/codec/``), collective (:mod:`diloco.comm`), attack and payload validation
(:mod:`diloco.adversary`), the validator and the aggregator, configured once by
:meth:`ExchangePipeline.from_config`. This package sits above ``comm`` and ``adversary``;
neither imports it.
"""

from diloco.exchange.pipeline import ExchangePipeline, ExchangeStats

__all__ = ["ExchangePipeline", "ExchangeStats"]
