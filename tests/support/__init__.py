"""Helpers shared by the test modules (real loopback servers, no network)."""

from pathlib import Path as _Path

REPO_ROOT = _Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
"""The project's shared design folder, beside the repository (as in CI)."""
FIXTURES = SHARED / "fixtures" / "label-studio"
"""Request bodies a real Label Studio 1.23.2 sent (see its README)."""
