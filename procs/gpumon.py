"""supervisord program `gpumon`: NVML telemetry publisher (appliance.gpu.monitor)."""
from appliance import logs, metrics
from appliance.config import load_settings

if __name__ == "__main__":
    logs.setup("gpumon")
    settings = load_settings()
    metrics.use_dir(settings.run_dir)  # before anything imports prometheus_client (appliance/metrics)
    from appliance.gpu.monitor import main

    main(settings)
