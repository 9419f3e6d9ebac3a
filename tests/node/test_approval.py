"""The bundle pin of a fedpeft node: which runs it takes part in, whatever the bundle holds."""

import pytest

from fedpeft.errors import ConfigError
from fedpeft.node.approval import APP_ID, APPROVAL_ENV, Approval, BundleRefused

HASH = "a" * 64


def test_by_default_only_fedpeft_at_the_installed_version_is_taken():
    approval = Approval()
    approval.check(APP_ID, approval.version, "f" * 64)
    with pytest.raises(BundleRefused, match=f"this node runs {APP_ID} {approval.version} only"):
        approval.check(APP_ID, "9.9.9", "f" * 64)
    with pytest.raises(BundleRefused, match="and the run's bundle is evil/app"):
        approval.check("evil/app", approval.version, "f" * 64)


def test_pinned_hashes_admit_only_those_bundles():
    approval = Approval(fab_hashes=frozenset({HASH}))
    approval.check(APP_ID, approval.version, HASH)
    with pytest.raises(BundleRefused, match="not among the bundles this node approved"):
        approval.check(APP_ID, approval.version, "b" * 64)
    with pytest.raises(ConfigError, match="--approve-fab 'xyz' is not a FAB hash"):
        Approval(fab_hashes=frozenset({"xyz"}))


def test_the_pin_reaches_each_runner_process_through_the_environment():
    approval = Approval(version="1.2.3", fab_hashes=frozenset({HASH}))
    assert Approval.from_env({APPROVAL_ENV: approval.to_env()}) == approval
    assert Approval.from_env({}) == Approval()
    with pytest.raises(ConfigError, match=f"{APPROVAL_ENV} is not a valid pin"):
        Approval.from_env({APPROVAL_ENV: '{"app_id": 1}'})
