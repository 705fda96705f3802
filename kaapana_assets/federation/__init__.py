"""The federation's transport, on Flower: the hub reaches its sites only through a SuperLink
their SuperNodes dial, every message signed with the site's own key. It carries steps and
knows none of them: a domain registers a step's hub and site handlers (registry.py), and
kaapana_assets/flower_apps.py, the app Flower loads, imports the domains that do.

Plain modules: channel (message format, signing, verification), payload (what may leave a
site), keys (site keys), guard (no identifier leaves a site; the small-cell floor), store (each
side's own federation folder), sites (the federation file), runs (start a Flower run),
superlink (Flower's processes), credentials (CA, certificates, node keys), registry (steps).
Flower entry points: serverapp (hub), clientapp (site), warm_superexec (the site's SuperExec).
local.py: a whole federation on this machine, for the demo and the tests."""
