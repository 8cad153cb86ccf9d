"""supervisord program `gpumon`: NVML telemetry publisher (appliance.gpu.monitor)."""
from appliance import logs
from appliance.config import load_settings
from appliance.gpu.monitor import main

if __name__ == "__main__":
    logs.setup("gpumon")
    main(load_settings())
