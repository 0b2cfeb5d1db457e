"""Test-tier support: prerequisites, network namespaces and the VM runner."""
