"""Stateful fakes of the kernel verbs, held to the real kernel by contract suites."""
