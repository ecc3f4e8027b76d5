"""Performance: analytic FLOPs (flops), MFU and throughput logging (mfu), AOT plans for TPU topologies (plan)."""
