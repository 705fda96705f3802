"""The top of the processes Flower starts for a federation: the hub's ServerApp and a site's
ClientApp, which Flower loads by the names runs.py writes into the app's pyproject.toml
(APP_MODULE), and which kaapana-superexec imports ahead at a site.

The one module that lists the domains providing steps: importing a step module registers
its steps with the transport (federation/registry.py), which imports none of them. The code
location never imports this module (it would load torch and Flower)."""

from kaapana_assets.federated import steps as federated_steps
from kaapana_assets.federation.clientapp import client_app
from kaapana_assets.federation.serverapp import server_app
from kaapana_assets.monitoring import steps as monitoring_steps

STEP_MODULES = (federated_steps, monitoring_steps)  # plan and round; statistics

serverapp = server_app()
clientapp = client_app()

__all__ = ["STEP_MODULES", "clientapp", "serverapp"]
