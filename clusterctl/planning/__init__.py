"""Before a GPU-hour is spent (pure): cluster profiles, the batch split and per-GPU memory under ZeRO
(plan, memory), time / GPU-hour / energy / CO2 estimates and claim audits (estimates, site, carbon).
No typer, no rich, no scheduler: every function here is a plain function of its inputs."""
