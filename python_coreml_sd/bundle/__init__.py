"""Bundles for apps (issue 7): `Resources/` folders laid out as Apple's Swift pipeline loads them,
reproducible zip archives of those folders, and safe extraction of such archives; one module a job
(resources, compile, archive, extract, plan):

    bundle_packages(options, written_paths, dest)   # .mlpackage files under Apple's names (any OS)
    bundle_compiled(options, written_paths, dest)   # .mlmodelc via xcrun coremlcompiler (macOS)
    make_zip(resources_dir, dest_zip, manifest_fields)
    extract_bundle(zip_path, dest)
"""
from .archive import FORMAT, MANIFEST, make_zip, manifest_fields, sha256_file, zip_name
from .extract import MAX_COMPRESSION_RATIO, MAX_EXTRACTED_BYTES, RATIO_EXEMPT_BYTES, extract_bundle, models_folder
from .plan import BundlePlan, plan_bundle
from .resources import (BASE_NAMES, PIPELINE_CONFIG, SCHEDULER_CONFIG, bundle_compiled, bundle_packages,
                        pipeline_settings, resource_entries)

