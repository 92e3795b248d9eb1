"""`python -m bench`: gpuproxy's command path against same-run baselines.

This machine is shared and noisy, so an absolute figure means little on its own: every
scenario runs in the same invocation as the baselines it is compared with, and the report
states each of ours as a ratio against them.
"""
