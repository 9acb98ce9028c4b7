"""Shared test set-up: the project's process environment before any heavy import."""

from cluster.runtime import set_default_environment

set_default_environment()
