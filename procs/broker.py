"""supervisord program `broker`: the priority broker (appliance.broker.server)."""
from appliance import logs
from appliance.broker.server import main
from appliance.config import load_settings

if __name__ == "__main__":
    logs.setup("broker")
    main(load_settings())
