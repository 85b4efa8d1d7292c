"""Decoding Core ML look-up-table (palettized) weights to dense arrays: the one decoder, numpy only, used by
the MIL runtime's constexpr ops and by the palettizer's checks."""
import numpy as np


def unpack_bits(packed, nbits, count):
    """Elements packed LSB-first into bytes (the Core ML layout of iOS16 constexpr ops)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint16)
    return (bits << np.arange(nbits, dtype=np.uint16)).sum(axis=1)


def lut_iOS16(indices, lut, shape):
    """iOS16 constexpr_lut_to_dense: one flat table, indices bit-packed LSB first."""
    nbits = int(np.log2(len(lut)))
    count = int(np.prod(shape))
    return np.asarray(lut)[unpack_bits(indices, nbits, count)].reshape(tuple(int(s) for s in shape))


def lut_iOS18(indices, lut, vector_axis=None):
    """iOS18 constexpr_lut_to_dense: one table per block of the weight (lut: blocks per axis, palette, vector
    size); with vector size > 1 each index stands for that many values along `vector_axis`."""
    indices = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    rank = indices.ndim
    # The flat table number of each element, built axis by axis in one index array (no meshgrid per axis).
    table = np.zeros((1,) * rank, np.int64)
    for axis, (size, blocks) in enumerate(zip(indices.shape, lut.shape[:rank])):
        along = (np.arange(size) // (size // blocks)).reshape([-1 if a == axis else 1 for a in range(rank)])
        table = table * blocks + along
    vectors = lut.reshape(-1, *lut.shape[rank:])[table, indices]  # indices.shape + (vector size,)
    if lut.shape[-1] == 1:
        return vectors[..., 0]
    axis = vector_axis + rank if vector_axis < 0 else vector_axis
    moved = np.moveaxis(vectors, -1, axis + 1)  # each vector right after its element along the axis
    shape = list(indices.shape)
    shape[axis] *= lut.shape[-1]
    return moved.reshape(shape)
