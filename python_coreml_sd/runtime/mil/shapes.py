"""Flexible input shapes: which shapes a model allows, and the program specialized to one of them.

A Core ML model with `RangeDim` / `EnumeratedShapes` inputs declares, in its description, a range
per dimension (`shapeRange`) or a list of shapes (`enumeratedShapes`); its ML Program leaves those
dimensions unknown. The runtime's plan needs every shape known (builders bake shapes), so a program
is specialized per concrete input shape: the unknown dimensions of the function's inputs are set in
a copy of the protobuf and coremltools' loader re-runs type (and shape-value) inference over it.
"""
import copy


class AllowedShapes:
    """The shapes one input accepts: per-dimension [lo, hi] ranges (hi None = unbounded) or an
    explicit list of shapes. `default` is the shape the model description names first."""

    def __init__(self, name, default, ranges=None, shapes=None):
        self.name = name
        self.default = tuple(default)
        self.ranges = ranges
        self.shapes = shapes

    def allows(self, shape):
        shape = tuple(int(d) for d in shape)
        if self.shapes is not None:
            return shape in self.shapes
        return len(shape) == len(self.ranges) and all(
            lo <= d and (hi is None or d <= hi) for d, (lo, hi) in zip(shape, self.ranges))

    def __str__(self):
        if self.shapes is not None:
            return "one of " + ", ".join(str(s) for s in self.shapes)
        dims = [str(lo) if lo == hi else f"{lo}..{'' if hi is None else hi}" for lo, hi in self.ranges]
        return "(" + ", ".join(dims) + ")"

    def __repr__(self):
        return f"AllowedShapes({self.name!r}, {self})"


def _feature(spec, function_name, name):
    """The model description's entry for input `name` (multifunction packages describe each function)."""
    descriptions = [f for f in spec.description.functions if f.name == function_name]
    features = descriptions[0].input if descriptions else spec.description.input
    return next((f for f in features if f.name == name), None)


def _mil_dims(named_value_type):
    """Per dimension of a function input: its size, or None where the program leaves it unknown."""
    tensor = named_value_type.type.tensorType
    if named_value_type.type.WhichOneof("type") == "stateType":
        tensor = named_value_type.type.stateType.wrappedType.tensorType
    return [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tensor.dimensions]


def allowed_shapes(spec, function_name):
    """{input name: AllowedShapes} for the inputs of the function whose shape is not fixed."""
    function = spec.mlProgram.functions[function_name]
    allowed = {}
    for inp in function.inputs:
        dims = _mil_dims(inp)
        if all(d is not None for d in dims):
            continue
        feature = _feature(spec, function_name, inp.name)
        array = feature.type.multiArrayType if feature is not None else None
        allowed[inp.name] = _from_description(inp.name, dims, array)
    return allowed


def _from_description(name, dims, array):
    flex = array.WhichOneof("ShapeFlexibility") if array is not None else None
    if flex == "enumeratedShapes":
        shapes = [tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes]
        default = tuple(array.shape) if len(array.shape) == len(dims) else shapes[0]
        return AllowedShapes(name, default, shapes=shapes)
    if flex == "shapeRange":
        ranges = [(int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                  for r in array.shapeRange.sizeRanges]
    else:  # unknown dims the description does not bound: any size >= 1
        ranges = [(1, None) if d is None else (d, d) for d in dims]
    if array is not None and len(array.shape) == len(dims):
        default = tuple(int(d) for d in array.shape)
    else:
        default = tuple(lo for lo, _ in ranges)
    return AllowedShapes(name, default, ranges=ranges)


def specialized_spec(spec, function_name, shapes):
    """A copy of `spec` whose function inputs have the concrete `shapes` ({name: tuple})."""
    spec = copy.deepcopy(spec)
    function = spec.mlProgram.functions[function_name]
    for inp in function.inputs:
        if inp.name not in shapes:
            continue
        tensor = inp.type.tensorType
        if inp.type.WhichOneof("type") == "stateType":
            tensor = inp.type.stateType.wrappedType.tensorType
        del tensor.dimensions[:]
        for d in shapes[inp.name]:
            tensor.dimensions.add().constant.size = int(d)
    return spec
