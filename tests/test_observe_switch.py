"""Where observe mode is switched on: the policy file's [settings] (tests/test_policy_observe.py) or
the kernelspec (`capsem kernel install --observe` -> CapsemProvisioner.observe_mode -> EgressConfig)."""

import json

from capsem_vm.config import EgressConfig
from capsem_vm.egress import Egress
from capsem_vm.policy import parse_policy

from test_kernel_unit import install, provisioner


def test_install_observe_writes_the_trait_and_the_vm_config_carries_it(tmp_path):
    install(tmp_path)
    install(tmp_path, "--name", "capsem-lab", "--observe")
    data = json.loads((tmp_path / "share" / "jupyter" / "kernels" / "capsem-lab" / "kernel.json").read_text())
    assert data["metadata"]["kernel_provisioner"]["config"] == {"observe_mode": True}
    assert provisioner(tmp_path, "capsem-lab")._vm_config(str(tmp_path)).egress.observe is True
    plain = provisioner(tmp_path, "capsem")
    assert plain.observe_mode is False and plain._vm_config(str(tmp_path)).egress.observe is False


def test_an_observing_kernel_with_no_allow_rule_still_gets_the_proxy():
    e = Egress(EgressConfig(kernel_id="k"))
    e.policy = parse_policy("")
    assert not e.needs_proxy  # deny all: the bridge answers everything itself
    e.policy = parse_policy("[settings]\nobserve = true\n")
    assert e.needs_proxy  # what it would deny goes out through the proxy
