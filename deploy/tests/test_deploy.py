"""Wiring tests of the Azure template, the package metadata and the unit.

Run from the repository root:  python3 -m unittest discover -s deploy/tests -v
deploy/check.sh runs them; with NAT_DEB set to the built .deb they also check
that the install script installs that very package.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from armeval import Evaluator  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
AZURE = ROOT / "deploy" / "azure"
TEMPLATE = json.loads((AZURE / "azuredeploy.json").read_text(encoding="utf-8"))
PARAMS_FILE = json.loads((AZURE / "azuredeploy.parameters.json").read_text(encoding="utf-8"))
FILE_VALUES = {k: v["value"] for k, v in PARAMS_FILE["parameters"].items()}
INSTALL_SH = (AZURE / "install.sh").read_bytes()
UNIT_TEXT = (ROOT / "packaging" / "nat-loader.service").read_text(encoding="utf-8")
CARGO = tomllib.loads((ROOT / "nat-loader" / "Cargo.toml").read_text(encoding="utf-8"))
DEB_META = CARGO["package"]["metadata"]["deb"]


def loader_default_probe_port() -> int:
    src = (ROOT / "nat-common" / "src" / "lib.rs").read_text(encoding="utf-8")
    m = re.search(r"pub\s+const\s+DEFAULT_PROBE_PORT\s*:\s*u16\s*=\s*(\d+)\s*;", src)
    if not m:
        raise AssertionError("nat-common/src/lib.rs defines no `pub const DEFAULT_PROBE_PORT: u16`")
    return int(m.group(1))


def evaluated(**overrides) -> tuple[Evaluator, list[dict]]:
    """The template's resources as the deployment would see them with the
    parameters file's values plus overrides."""
    ev = Evaluator(TEMPLATE, {**FILE_VALUES, **overrides})
    resources = []
    for r in TEMPLATE["resources"]:
        if "condition" in r and not ev.resolve(r["condition"]):
            continue
        resources.append(ev.resolve({k: v for k, v in r.items() if k != "condition"}))
    return ev, resources


def one(resources: list[dict], rtype: str, name_part: str | None = None) -> dict:
    found = [r for r in resources if r["type"] == rtype and (name_part is None or name_part in r["name"])]
    if len(found) != 1:
        raise AssertionError(f"expected one {rtype} ({name_part}), found {len(found)}")
    return found[0]


def rid(ev: Evaluator, rtype: str, *names: str) -> str:
    quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in names)
    return ev.expression(f"resourceId('{rtype}', {quoted})")


def subnets_of(ev: Evaluator, resources: list[dict]) -> dict[str, dict]:
    """Subnet resource ID -> properties, for a new or an existing network."""
    out = {}
    for r in resources:
        if r["type"] == "Microsoft.Network/virtualNetworks":
            for s in r["properties"]["subnets"]:
                out[rid(ev, "Microsoft.Network/virtualNetworks/subnets", r["name"], s["name"])] = s["properties"]
        elif r["type"] == "Microsoft.Network/virtualNetworks/subnets":
            vnet, sub = r["name"].split("/")
            out[rid(ev, "Microsoft.Network/virtualNetworks/subnets", vnet, sub)] = r["properties"]
    return out


# Parameter sets every wiring test runs against.
SCENARIOS = {
    "parameters file": {},
    "existing network": {"vnetNewOrExisting": "existing"},
    "http probe + ssh pool": {"healthProbeProtocol": "Http", "enableSshNatPool": True,
                              "sshSourceAddressPrefix": "198.51.100.0/24"},
    "other addresses": {"backendSubnetPrefix": "172.16.8.0/22", "internalLbPrivateIp": "172.16.9.10",
                        "frontendSubnetPrefix": "172.16.0.0/24", "vnetAddressPrefix": "172.16.0.0/16"},
}


class Template(unittest.TestCase):
    def test_parses_and_parameters_file_matches(self):
        self.assertIn("deploymentTemplate.json", TEMPLATE["$schema"])
        self.assertIn("deploymentParameters.json", PARAMS_FILE["$schema"])
        unknown = set(FILE_VALUES) - set(TEMPLATE["parameters"])
        self.assertFalse(unknown, f"parameters file sets unknown parameters {unknown}")
        required = {k for k, v in TEMPLATE["parameters"].items() if "defaultValue" not in v}
        self.assertLessEqual(required, set(FILE_VALUES), "parameters file lacks required parameters")
        for name, spec in TEMPLATE["parameters"].items():
            self.assertTrue(spec.get("metadata", {}).get("description"), f"parameter {name} has no description")
        for name, _ in SCENARIOS.items():
            with self.subTest(scenario=name):
                evaluated(**SCENARIOS[name])  # every expression resolves

    def test_probe_port_equals_loader_default(self):
        port = loader_default_probe_port()
        self.assertEqual(TEMPLATE["parameters"]["probePort"]["defaultValue"], port,
                         "template's probePort default != nat-common DEFAULT_PROBE_PORT")
        self.assertEqual(FILE_VALUES.get("probePort", port), port, "parameters file's probePort != loader default")
        ev, res = evaluated()
        probe = one(res, "Microsoft.Network/loadBalancers", "int-lb")["properties"]["probes"][0]["properties"]
        self.assertEqual((probe["protocol"], probe["port"]), ("Tcp", port))
        self.assertEqual((probe["intervalInSeconds"], probe["numberOfProbes"]), (5, 2))
        health = self._health_extension(res)["settings"]
        self.assertEqual((health["protocol"], health["port"]), ("tcp", port))
        self.assertIn(f"--probe-port {port}", ev.variable("installCommand"))

    def test_metrics_port_is_passed_to_the_loader_and_open_to_the_virtual_network_only(self):
        ev, res = evaluated(metricsPort=9200)
        self.assertIn("--metrics-listen 0.0.0.0:9200", ev.variable("installCommand"))
        nsgs = [r for r in res if r["type"] == "Microsoft.Network/networkSecurityGroups"]
        allowing = []
        for nsg in nsgs:
            rules = ev.resolve(nsg["properties"]["securityRules"])
            for rule in rules:
                p = rule["properties"]
                if p["access"] == "Allow" and p["direction"] == "Inbound" \
                        and p["destinationPortRange"] in ("9200", "*"):
                    allowing.append(p["sourceAddressPrefix"])
        self.assertIn("VirtualNetwork", allowing)
        self.assertTrue(set(allowing) <= {"VirtualNetwork", "AzureLoadBalancer"},
                        f"the metrics port is open to {allowing}")

    def test_http_probe_uses_healthz_on_health_port(self):
        ev, res = evaluated(healthProbeProtocol="Http", healthPort=8081)
        probe = one(res, "Microsoft.Network/loadBalancers", "int-lb")["properties"]["probes"][0]["properties"]
        self.assertEqual((probe["protocol"], probe["port"], probe["requestPath"]), ("Http", 8081, "/healthz"))
        self.assertEqual((probe["intervalInSeconds"], probe["numberOfProbes"]), (5, 2))
        health = self._health_extension(res)["settings"]
        self.assertEqual((health["protocol"], health["port"], health["requestPath"]), ("http", 8081, "/healthz"))
        self.assertIn("--health-port 8081", ev.variable("installCommand"))

    def test_route_next_hop_is_internal_lb_frontend_ip(self):
        for name, overrides in SCENARIOS.items():
            with self.subTest(scenario=name):
                ev, res = evaluated(**overrides)
                rt = one(res, "Microsoft.Network/routeTables")
                routes = [r["properties"] for r in rt["properties"]["routes"]]
                default = [r for r in routes if r["addressPrefix"] == "0.0.0.0/0"]
                self.assertEqual(len(default), 1, "one default route")
                ilb = one(res, "Microsoft.Network/loadBalancers", "int-lb")
                fe = ilb["properties"]["frontendIPConfigurations"]
                self.assertEqual(len(fe), 1)
                fe = fe[0]["properties"]
                self.assertEqual(fe["privateIPAllocationMethod"], "Static")
                self.assertEqual(default[0]["nextHopType"], "VirtualAppliance")
                self.assertEqual(default[0]["nextHopIpAddress"], fe["privateIPAddress"])
                # The VIP lies in the backend subnet, past Azure's 4 reserved addresses...
                backend_id = ev.variable("backendSubnetId")
                self.assertEqual(fe["subnet"]["id"], backend_id)
                net = ipaddress.ip_network(ev.parameter("backendSubnetPrefix"))
                vip = ipaddress.ip_address(fe["privateIPAddress"])
                self.assertIn(vip, net)
                self.assertGreaterEqual(int(vip) - int(net.network_address), 4)
                self.assertNotEqual(vip, net.broadcast_address)
                # ...and the route table is the backend subnet's, not the frontend's.
                subnets = subnets_of(ev, res)
                rt_id = rid(ev, "Microsoft.Network/routeTables", rt["name"])
                self.assertEqual(subnets[backend_id]["routeTable"]["id"], rt_id)
                self.assertNotIn("routeTable", subnets[ev.variable("frontendSubnetId")])

    def test_both_nics_forward_ip(self):
        for name, overrides in SCENARIOS.items():
            with self.subTest(scenario=name):
                ev, res = evaluated(**overrides)
                nics = self._vmss(res)["properties"]["virtualMachineProfile"]["networkProfile"][
                    "networkInterfaceConfigurations"]
                self.assertEqual([n["name"] for n in nics], ["ext", "int"])
                ext, intl = (n["properties"] for n in nics)
                for nic in (ext, intl):
                    self.assertIs(nic["enableIPForwarding"], True)
                    self.assertIs(nic["enableAcceleratedNetworking"], ev.parameter("enableAcceleratedNetworking"))
                self.assertIs(ext["primary"], True)
                self.assertIs(intl["primary"], False)
                ext_ip = ext["ipConfigurations"][0]["properties"]
                int_ip = intl["ipConfigurations"][0]["properties"]
                self.assertEqual(ext_ip["subnet"]["id"], ev.variable("frontendSubnetId"))
                self.assertEqual(int_ip["subnet"]["id"], ev.variable("backendSubnetId"))
                self.assertEqual([p["id"] for p in ext_ip["loadBalancerBackendAddressPools"]],
                                 [ev.variable("extPoolId")])
                self.assertEqual([p["id"] for p in int_ip["loadBalancerBackendAddressPools"]],
                                 [ev.variable("intPoolId")])
        _, res = evaluated(enableAcceleratedNetworking=False)
        for nic in self._vmss(res)["properties"]["virtualMachineProfile"]["networkProfile"][
                "networkInterfaceConfigurations"]:
            self.assertIs(nic["properties"]["enableAcceleratedNetworking"], False)

    def test_ha_ports_rule(self):
        ev, res = evaluated()
        ilb = one(res, "Microsoft.Network/loadBalancers", "int-lb")
        self.assertEqual(ilb["sku"]["name"], "Standard")
        rules = ilb["properties"]["loadBalancingRules"]
        self.assertEqual(len(rules), 1)
        rule = rules[0]["properties"]
        self.assertEqual((rule["protocol"], rule["frontendPort"], rule["backendPort"]), ("All", 0, 0))
        ilb_id = rid(ev, "Microsoft.Network/loadBalancers", ilb["name"])
        self.assertEqual(rule["frontendIPConfiguration"]["id"],
                         f"{ilb_id}/frontendIPConfigurations/{ilb['properties']['frontendIPConfigurations'][0]['name']}")
        self.assertEqual(rule["backendAddressPool"]["id"], ev.variable("intPoolId"))
        self.assertEqual(rule["probe"]["id"], f"{ilb_id}/probes/{ilb['properties']['probes'][0]['name']}")
        self.assertEqual(ev.variable("intPoolId"),
                         f"{ilb_id}/backendAddressPools/{ilb['properties']['backendAddressPools'][0]['name']}")

    def test_external_lb_outbound_rule_and_ssh_pool(self):
        for ssh in (False, True):
            with self.subTest(ssh_pool=ssh):
                ev, res = evaluated(enableSshNatPool=ssh, sshSourceAddressPrefix="198.51.100.0/24")
                pip = one(res, "Microsoft.Network/publicIPAddresses")
                self.assertEqual((pip["sku"]["name"], pip["properties"]["publicIPAllocationMethod"]),
                                 ("Standard", "Static"))
                elb = one(res, "Microsoft.Network/loadBalancers", "ext-lb")
                self.assertEqual(elb["sku"]["name"], "Standard")
                elb_id = rid(ev, "Microsoft.Network/loadBalancers", elb["name"])
                fe = elb["properties"]["frontendIPConfigurations"][0]
                self.assertEqual(fe["properties"]["publicIPAddress"]["id"],
                                 rid(ev, "Microsoft.Network/publicIPAddresses", pip["name"]))
                out = elb["properties"]["outboundRules"][0]["properties"]
                self.assertEqual(out["backendAddressPool"]["id"], ev.variable("extPoolId"))
                self.assertEqual(out["protocol"], "All")
                self.assertEqual(out["allocatedOutboundPorts"] % 8, 0)
                self.assertLessEqual(out["allocatedOutboundPorts"] * ev.parameter("autoscaleMaxCount"), 64000,
                                     "one public IP has too few SNAT ports for the largest scale set")
                pools = elb["properties"]["inboundNatPools"]
                nic_pools = self._vmss(res)["properties"]["virtualMachineProfile"]["networkProfile"][
                    "networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"][0]["properties"][
                    "loadBalancerInboundNatPools"]
                if ssh:
                    p = pools[0]["properties"]
                    self.assertEqual((p["protocol"], p["frontendPortRangeStart"], p["backendPort"]),
                                     ("Tcp", 50000, 22))
                    self.assertGreaterEqual(p["frontendPortRangeEnd"] - p["frontendPortRangeStart"] + 1,
                                            ev.parameter("autoscaleMaxCount"))
                    self.assertEqual([x["id"] for x in nic_pools], [f"{elb_id}/inboundNatPools/{pools[0]['name']}"])
                else:
                    self.assertEqual((pools, nic_pools), ([], []))

    def test_extra_ip_configurations_each_have_a_public_ip_and_the_loader_pools_them_all(self):
        for n in (1, 4, 16):
            with self.subTest(ip_configs=n):
                ev, res = evaluated(publicIpConfigsPerInstance=n)
                ext = self._vmss(res)["properties"]["virtualMachineProfile"]["networkProfile"][
                    "networkInterfaceConfigurations"][0]["properties"]
                configs = ext["ipConfigurations"]
                self.assertEqual(len(configs), n)
                self.assertEqual(len({c["name"] for c in configs}), n, "ip configuration names repeat")
                primary, *extra = configs
                self.assertIs(primary["properties"]["primary"], True)
                self.assertNotIn("publicIPAddressConfiguration", primary["properties"])
                for c in extra:
                    p = c["properties"]
                    self.assertIs(p["primary"], False)
                    self.assertEqual(p["subnet"]["id"], ev.variable("frontendSubnetId"))
                    self.assertEqual(p["publicIPAddressConfiguration"]["sku"]["name"], "Standard")
                self.assertIn("--snat-ip auto", ev.variable("loaderArgs"))
        spec = TEMPLATE["parameters"]["publicIpConfigsPerInstance"]
        self.assertEqual((spec["minValue"], spec["maxValue"]), (1, 16))

    def test_nsgs_let_in_only_probes_and_vnet(self):
        for ssh in (False, True):
            with self.subTest(ssh_pool=ssh):
                ev, res = evaluated(enableSshNatPool=ssh, sshSourceAddressPrefix="198.51.100.0/24")
                subnets = subnets_of(ev, res)
                for sid in (ev.variable("frontendSubnetId"), ev.variable("backendSubnetId")):
                    nsg_id = subnets[sid]["networkSecurityGroup"]["id"]
                    nsg = next(r for r in res if r["type"] == "Microsoft.Network/networkSecurityGroups"
                               and rid(ev, r["type"], r["name"]) == nsg_id)
                    inbound = sorted((r["properties"] for r in nsg["properties"]["securityRules"]
                                      if r["properties"]["direction"] == "Inbound"), key=lambda p: p["priority"])
                    last = inbound[-1]
                    self.assertEqual((last["access"], last["sourceAddressPrefix"], last["destinationPortRange"]),
                                     ("Deny", "*", "*"), f"{nsg['name']} must end with deny-all")
                    for rule in inbound[:-1]:
                        self.assertEqual(rule["access"], "Allow")
                        if rule["destinationPortRange"] == "22" and ssh:
                            self.assertEqual(rule["sourceAddressPrefix"], "198.51.100.0/24")
                            continue
                        self.assertIn(rule["sourceAddressPrefix"], ("AzureLoadBalancer", "VirtualNetwork"),
                                      f"{nsg['name']} lets in {rule['sourceAddressPrefix']}")
                    sources = {r["sourceAddressPrefix"] for r in inbound}
                    self.assertLessEqual({"AzureLoadBalancer", "VirtualNetwork"}, sources)

    def test_scale_set(self):
        ev, res = evaluated()
        vmss = self._vmss(res)
        p = vmss["properties"]
        self.assertEqual(p["orchestrationMode"], "Uniform")
        self.assertEqual(sorted(vmss["zones"]), ["1", "2", "3"])
        img = p["virtualMachineProfile"]["storageProfile"]["imageReference"]
        self.assertEqual((img["publisher"], img["offer"]), ("Canonical", "ubuntu-24_04-lts"))
        self.assertEqual(p["upgradePolicy"]["mode"], "Rolling")
        self.assertTrue(p["automaticRepairsPolicy"]["enabled"])
        term = p["virtualMachineProfile"]["scheduledEventsProfile"]["terminateNotificationProfile"]
        self.assertTrue(term["enable"])
        # The notice is only worth something if the loader listens for it:
        # it drains, then approves the event.
        self.assertIn("--scheduled-events", ev.variable("installCommand"))
        self.assertTrue(p["virtualMachineProfile"]["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"])
        health = self._health_extension(res)
        self.assertEqual(health["type"], "ApplicationHealthLinux")
        self.assertIn("install-nat-loader", health["provisionAfterExtensions"])

    def test_autoscale(self):
        ev, res = evaluated()
        auto = one(res, "Microsoft.Insights/autoscalesettings")["properties"]
        self.assertEqual(auto["targetResourceUri"], rid(ev, "Microsoft.Compute/virtualMachineScaleSets",
                                                        self._vmss(res)["name"]))
        prof = auto["profiles"][0]
        self.assertEqual((prof["capacity"]["minimum"], prof["capacity"]["maximum"]), ("2", "10"))
        rules = {r["scaleAction"]["direction"]: r for r in prof["rules"]}
        out, inn = rules["Increase"], rules["Decrease"]
        self.assertEqual((out["metricTrigger"]["metricName"], out["metricTrigger"]["operator"],
                          out["metricTrigger"]["threshold"]), ("Percentage CPU", "GreaterThan", 75))
        self.assertEqual((inn["metricTrigger"]["metricName"], inn["metricTrigger"]["operator"],
                          inn["metricTrigger"]["threshold"]), ("Percentage CPU", "LessThan", 20))
        for r in (out, inn):
            self.assertRegex(r["scaleAction"]["cooldown"], r"^PT\d+M$")

    def test_template_runs_the_install_script(self):
        embedded = base64.b64decode(TEMPLATE["variables"]["installScriptBase64"])
        self.assertEqual(embedded, INSTALL_SH,
                         "azuredeploy.json embeds a stale install.sh: run python3 deploy/azure/sync_install_script.py")
        ev, res = evaluated()
        cse = next(e["properties"] for e in self._extensions(res) if e["name"] == "install-nat-loader")
        self.assertEqual((cse["publisher"], cse["type"]), ("Microsoft.Azure.Extensions", "CustomScript"))
        cmd = cse["protectedSettings"]["commandToExecute"]
        self.assertIn("echo " + TEMPLATE["variables"]["installScriptBase64"] + " | base64 -d", cmd)
        self.assertIn(f"--package-url '{FILE_VALUES['packageUrl']}'", cmd)
        self.assertIn("--ext auto --int auto", cmd)

    def test_install_script_installs_the_built_package(self):
        name = DEB_META.get("name", CARGO["package"]["name"])
        m = re.search(rb"^readonly PACKAGE=(\S+)$", INSTALL_SH, re.M)
        self.assertIsNotNone(m)
        self.assertEqual(m.group(1).decode(), name, "install.sh installs another package than cargo-deb builds")
        self.assertRegex(FILE_VALUES["packageUrl"].rsplit("/", 1)[-1], rf"^{re.escape(name)}_[^_]+_amd64\.deb$")
        deb = os.environ.get("NAT_DEB")
        if not deb:
            self.skipTest("NAT_DEB (the built .deb) not given")
        built = subprocess.run(["dpkg-deb", "--field", deb, "Package"], check=True, capture_output=True,
                               text=True).stdout.strip()
        self.assertEqual(built, name)

    # ----- helpers -----
    def _vmss(self, res):
        return one(res, "Microsoft.Compute/virtualMachineScaleSets")

    def _extensions(self, res):
        return self._vmss(res)["properties"]["virtualMachineProfile"]["extensionProfile"]["extensions"]

    def _health_extension(self, res):
        return next(e["properties"] for e in self._extensions(res) if e["name"] == "health")


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT_TEXT.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    total, units = 0.0, {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


class Packaging(unittest.TestCase):
    def test_unit(self):
        d = unit_directives()
        self.assertIn("network-online.target", " ".join(d["After"]))
        self.assertIn("network-online.target", " ".join(d["Wants"]))
        self.assertEqual(d["Restart"], ["on-failure"])
        self.assertEqual(d["ProtectSystem"], ["strict"])
        self.assertEqual(d.get("NoNewPrivileges"), ["yes"])
        caps = set(" ".join(d["CapabilityBoundingSet"]).split())
        self.assertLessEqual({"CAP_NET_ADMIN", "CAP_BPF"}, caps)
        self.assertLessEqual(caps, {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"})
        self.assertEqual(d.get("KillSignal", ["SIGTERM"]), ["SIGTERM"])
        self.assertGreater(seconds(d["TimeoutStopSec"][0]), 30, "stop timeout must exceed the 30 s drain")
        exec_start = d["ExecStart"][0]
        self.assertTrue(exec_start.startswith("/usr/bin/nat-loader "))
        self.assertIn("--config /etc/nat-loader/nat-loader.toml", exec_start)
        self.assertTrue(exec_start.endswith(" $NAT_LOADER_ARGS"), "flags from the env file come last")
        self.assertEqual(d["EnvironmentFile"], ["/etc/nat-loader/nat-loader.env"])

    def test_env_file_holds_only_the_extra_flags(self):
        env = dict(line.split("=", 1) for line in (ROOT / "packaging" / "nat-loader.env").read_text().splitlines()
                   if line and not line.startswith("#"))
        self.assertEqual(env, {"NAT_LOADER_ARGS": ""})

    def test_config_file_sets_nothing_and_documents_its_keys(self):
        text = (ROOT / "packaging" / "nat-loader.toml").read_text()
        self.assertEqual(tomllib.loads(text), {}, "the packaged config file must set nothing")
        keys = re.findall(r"^# ([a-z-]+) = ", text, re.M)
        self.assertEqual(len(keys), len(set(keys)), "a key is listed twice")
        for key in ("ext", "int", "port-range", "probe-port", "scheduled-events", "max-flows"):
            self.assertIn(key, keys)
        uncommented = "\n".join(line[2:] for line in text.splitlines() if re.match(r"^# [a-z-]+ = ", line))
        self.assertEqual(set(tomllib.loads(uncommented)), set(keys), "every listed key parses when uncommented")

    def test_deb_metadata(self):
        assets = {a[0]: a[1] for a in DEB_META["assets"]}
        self.assertEqual(assets["target/release/nat-loader"], "usr/bin/")
        self.assertEqual(assets["../packaging/nat-loader.env"], "etc/nat-loader/nat-loader.env")
        self.assertIn("/etc/nat-loader/nat-loader.env", DEB_META["conf-files"])
        self.assertIn(["../packaging/nat-loader.toml", "etc/nat-loader/nat-loader.toml", "644"], DEB_META["assets"])
        self.assertIn("/etc/nat-loader/nat-loader.toml", DEB_META["conf-files"])
        units = DEB_META["systemd-units"]
        self.assertEqual(units["unit-name"], "nat-loader")
        self.assertIs(units["start"], False)
        self.assertIn("systemd", DEB_META["depends"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
