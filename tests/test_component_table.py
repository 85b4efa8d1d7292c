"""The component table (python_coreml_sd/components.py) is what the packages, the Swift package and the
import structure actually are."""
import ast
import re
from pathlib import Path

import coremltools as ct

from python_coreml_sd import registry
from python_coreml_sd.components import CONTROL, CONVERTIBLE, SD, SDXL, TABLE, TIME_IDS, Dims, component_of

ROOT = Path(__file__).resolve().parent.parent
SWIFT = ROOT / "swift" / "Sources" / "StableDiffusion"


def test_converted_packages_declare_the_tables_names(tiny_models_dir):
    found = {component_of(p): p for p in tiny_models_dir.glob("*.mlpackage")}
    # SDXL's: tests/test_sdxl.py; ControlNet's: tests/test_controlnet.py
    assert set(found) == {name for name in CONVERTIBLE if SD in TABLE[name].interfaces and name not in CONTROL}
    for name, package in found.items():
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        assert tuple(f.name for f in spec.description.input) == TABLE[name].inputs, name
        assert tuple(f.name for f in spec.description.output) == TABLE[name].outputs, name


def tiny_dims() -> Dims:
    arch = registry.family("tiny")["architecture"]
    size = arch["unet"]["sample_size"]
    return Dims(size, size, latent_channels=arch["vae"]["latent_channels"],
                text_hidden=arch["text_encoder"]["hidden_size"], sequence=arch["text_encoder"]["max_position_embeddings"],
                clip_image=arch["safety_checker"]["vision_config"]["image_size"])


def test_converted_packages_have_the_tables_shapes(tiny_models_dir):
    """The shapes the table computes from the model's sizes are the shapes the converters declare."""
    expected = {name: TABLE[name].input_shapes(tiny_dims(), SD) for name in CONVERTIBLE if SD in TABLE[name].interfaces}
    for package in tiny_models_dir.glob("*.mlpackage"):
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        declared = {f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input}
        assert declared == expected[component_of(package)], package.name


def test_file_and_resources_names_map_back_to_their_component():
    for name, spec in TABLE.items():
        assert component_of(Path(f"Stable_Diffusion_version_a_b_{name}.mlpackage")) == name
        assert component_of(Path(f"{spec.resource}.mlmodelc")) == name
    assert component_of(Path("notes.mlpackage")) is None and component_of(Path("Unet.txt")) is None
    for model in ("lllyasviel/sd-controlnet-canny", "my_unet"):  # ControlNets: Apple's ControlNet_<model>
        assert component_of(Path(TABLE["controlnet"].package_name(model))) == "controlnet"
    assert TABLE["controlnet"].package_name("lllyasviel/sd-controlnet-canny") == \
        "ControlNet_lllyasviel_sd-controlnet-canny.mlpackage"


def swift_literals() -> set:
    return {m for path in SWIFT.rglob("*.swift") for m in re.findall(r'"([A-Za-z_0-9]+)"', path.read_text())}


def test_swift_feeds_and_reads_the_tables_names():
    """Swift has its own constants (no Swift package can read this table at build time): each name the
    Swift pipeline uses must be the table's, and a renamed entry here fails until Swift follows."""
    literals = swift_literals()
    used = {"text_encoder": ("input_ids", "last_hidden_state"), "unet": TABLE["unet"].inputs + TABLE["unet"].outputs,
            "vae_decoder": ("z", "image"), "vae_encoder": ("x", "latent"),
            "safety_checker": TABLE["safety_checker"].inputs + ("has_nsfw_concepts",)}
    for component, names in used.items():
        spec = TABLE[component]
        assert set(names) <= set(spec.inputs + spec.outputs), component  # the list above is the table's
        assert set(names) <= literals, (component, set(names) - literals)
    # SDXL's (issue 16): both encoders' and both UNets' whole interfaces, and what each time id is
    for component in ("text_encoder", "text_encoder_2", "unet", "refiner"):
        assert set(TABLE[component].names(SDXL)) <= literals, (component, set(TABLE[component].names(SDXL)) - literals)
    assert {name for layout in TIME_IDS.values() for name in layout} <= literals
    # ControlNet's (ControlledUnet, controlnet/) wait for the Swift ControlNet pipeline (issue 19, later).
    assert {spec.resource for name, spec in TABLE.items() if name not in CONTROL} <= literals


def imports_of(path: Path, package_root: Path) -> set:
    """Modules of python_coreml_sd that a file imports, at any depth (lazy imports inside functions count)."""
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name.removesuffix(".__init__") for name in found if name.startswith("python_coreml_sd")}


def test_the_package_imports_in_no_circle():
    root = ROOT / "python_coreml_sd"
    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {name: {i for i in imports_of(path, root) if i in files and i != name} for name, path in files.items()}
    # packages' __init__ files re-export: an import of a package is an import of its __init__ only
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
