"""Tests of the vm tier itself: the guest it boots and the host-side runner."""
