"""What torch2coreml bundles after converting, planned and checked before any conversion work."""
import dataclasses
import sys
from pathlib import Path

from ..components import TOKENIZER_FILES
from ..errors import UserError
from .archive import make_zip, manifest_fields, sha256_file, zip_name
from .compile import require_compiler
from .resources import bundle_compiled, bundle_packages, check_shared_tokenizer, resource_entries


@dataclasses.dataclass
class BundlePlan:
    """What torch2coreml bundles after converting; made (and checked) before any conversion work."""
    options: object
    kind: str  # "packages" or "compiled"
    resources: Path
    zip_path: Path = None

    def build(self, written_paths) -> list:
        if self.resources.exists() and not self.options.overwrite:  # a rerun after an interrupted bundling
            resources = self._reuse_resources(written_paths)
        else:
            make = bundle_compiled if self.kind == "compiled" else bundle_packages
            resources = make(self.options, written_paths, self.resources)
        print(f"bundle: {resources}", file=sys.stderr, flush=True)
        if self.zip_path is None:
            return [resources]
        fields = manifest_fields(self.options, self.kind, resources)
        archive = make_zip(resources, self.zip_path, fields, overwrite=self.options.overwrite)
        print(f"zip: {archive} (sha256 {sha256_file(archive)})", file=sys.stderr, flush=True)
        return [resources, archive]


    def _reuse_resources(self, written_paths) -> Path:
        """An existing Resources/ is kept when it holds exactly the packages just converted or reused."""
        entries = resource_entries(written_paths)
        same = self.kind == "packages" and all(
            _tree_digest(self.resources / f"{name}.mlpackage") == _tree_digest(package)
            for name, package in entries.items()) and all((self.resources / f).is_file() for f in TOKENIZER_FILES)
        if not same:
            raise UserError(f"{self.resources} exists and does not hold these packages; pass --overwrite to "
                            "replace it or choose another -o")
        return self.resources


def _tree_digest(folder: Path) -> dict:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def plan_bundle(options, compiled: bool, packages: bool, zip_: bool) -> BundlePlan:
    """None when no bundle is asked for; raises UserError for what would fail only after converting."""
    if zip_ and not (compiled or packages):
        raise UserError("--zip archives a bundle: add --bundle-packages (or --bundle-resources-for-swift-cli on macOS)")
    if not (compiled or packages):
        return None
    from ..model_edits import source_for
    source = source_for(options)
    source.require_base()
    check_shared_tokenizer(source)
    if compiled:
        require_compiler()
    kind = "compiled" if compiled else "packages"
    plan = BundlePlan(options, kind, Path(options.output_dir) / "Resources",
                      Path(options.output_dir) / zip_name(options, kind) if zip_ else None)
    # An existing Resources/ is checked against the packages after converting (a rerun resumes there).
    if plan.zip_path and plan.zip_path.exists() and not options.overwrite:
        raise UserError(f"{plan.zip_path} exists; pass --overwrite to replace it")
    return plan
