"""Helpers of ``scripts/bench``: addresses, the target servers, the load generators, the proxy runner."""
