"""``quota-sidecar doctor``: every check a person would make by hand, with the fix for each.

    result    CheckResult (name, status ✓ ! ✗ -, detail, fix); text and JSON rendering
    local     checks on the configuration alone: config, secrets, redirect URI, internal listener
    remote    checks over the network: Quota and its clock, the client, the app's probe, Redis
    runner    run_checks(config, options): all of them, the network ones concurrently
    command   the CLI: load the configuration, run, print, exit 0 only if nothing failed

Tests and tools call ``run_checks`` with a ``Config`` directly; the command adds the loading.
"""

from sidecar.doctor.result import CheckResult, Status
from sidecar.doctor.runner import DoctorOptions, run_checks

__all__ = ["CheckResult", "DoctorOptions", "Status", "run_checks"]
