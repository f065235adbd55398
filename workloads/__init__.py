"""MoE architectures, routing traces, request streams and expert storage formats."""
