"""DeMo (Decoupled Momentum Optimization) as a standalone PyTorch optimizer.

Depends only on torch and einops. See :class:`demo_optim.DeMo`. Modules: ``dct`` (chunked
DCT), ``payload`` (wire format and aggregation), ``layout`` (parameter geometries) and
``demo`` (the optimizer).
"""

from demo_optim.dct import (
    chunk_shape,
    chunk_size,
    dct_basis,
    dct_decode,
    dct_encode,
    dct_nd,
    from_chunks,
    idct_nd,
    sparse_idct,
    to_chunks,
)
from demo_optim.demo import DeMo
from demo_optim.payload import (
    GatherFn,
    aggregate_sparse,
    all_gather_payload,
    compact_index_dtype,
    decode_aggregate,
    pack_signs,
    payload_nbytes,
    unpack_signs,
)

__all__ = [
    "DeMo",
    "GatherFn",
    "aggregate_sparse",
    "all_gather_payload",
    "chunk_shape",
    "chunk_size",
    "compact_index_dtype",
    "dct_nd",
    "decode_aggregate",
    "dct_basis",
    "dct_decode",
    "dct_encode",
    "from_chunks",
    "idct_nd",
    "pack_signs",
    "payload_nbytes",
    "sparse_idct",
    "to_chunks",
    "unpack_signs",
]
