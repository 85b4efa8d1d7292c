"""iOS18 state ops. A state input's runtime value is a `StateCell`, a holder the model's
`MILState` fills before a call and reads back after it: read_state returns the held tensor,
coreml_update_state replaces it (in program order, so a later read sees the update)."""
from .registry import op


class StateCell:
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


@op("read_state")
def read_state(a):
    return (lambda cell: cell.value), [a.var("input")]


@op("coreml_update_state")
def coreml_update_state(a):
    dt = a.out_torch_dtype()

    def fn(cell, value):
        cell.value = value if value.dtype == dt else value.to(dt)
        return cell.value

    return fn, [a.var("state"), a.var("value")]
