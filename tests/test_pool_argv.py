"""Configs written back into a child's command line read back as the same config: the pool
(`capsem pool start`, as the daemonizing start and the provisioner write it) and the keeper."""
from hypothesis import given, strategies as st

from capsem_vm.cli import build_parser
from capsem_vm.config import VMConfig
from capsem_vm.pool import wire
from capsem_vm.pool.config import PoolConfig
from capsem_vm.pool.keeper import keeper_argv, parse_keeper_args

# An argv element cannot hold a NUL; anything else may be an image name or directory, also text
# that looks like an option ("-x", "--size=3") or holds '=' and ','.
names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=20)
images = st.one_of(st.none(), names.filter(str.strip), st.sampled_from(["-x", "--size=3", "a=b", "/imgs/a,b"]))
memory = st.integers(*wire.MEMORY_MB)
cpus = st.integers(*wire.CPUS)
accels = st.sampled_from(["auto", "kvm", "tcg"])
timeouts = st.floats(min_value=0, max_value=1e9, allow_nan=False) | st.integers(0, 10_000).map(float)


@st.composite
def pool_configs(draw):
    main = (draw(memory), draw(cpus), draw(images))
    more, keys = [], {main}
    for shape in draw(st.lists(st.builds(wire.Shape, memory, cpus, st.integers(0, 1000), images), max_size=4)):
        key = (shape.memory_mb, shape.cpus, shape.image or main[2])
        if key not in keys:
            keys.add(key)
            more.append(shape)
    return PoolConfig(size=draw(st.integers(0, 1000)), memory_mb=main[0], cpus=main[1], image=main[2],
                      accel=draw(accels), budget_mb=draw(st.integers(-(1 << 20), 1 << 30)),
                      parallel=draw(st.integers(1, 64)), boot_timeout=draw(timeouts), more=tuple(more))


@given(pool_configs())
def test_pool_config_to_argv_parses_back_to_the_same_config(config):
    args = build_parser().parse_args(["pool", "start", "--foreground", *config.to_argv()])
    assert PoolConfig.from_args(args) == config


@given(st.integers(0, 1 << 20), memory, cpus, accels, images, timeouts)
def test_keeper_argv_parses_back_to_the_same_fd_and_config(fd, memory_mb, ncpus, accel, image, boot_timeout):
    config = VMConfig(memory_mb=memory_mb, cpus=ncpus, accel=accel, image=image, boot_timeout=boot_timeout)
    assert parse_keeper_args(keeper_argv(fd, config)) == (fd, config)


def test_the_provisioners_pool_command_keeps_the_pools_other_defaults():
    """The provisioner gives size, memory, CPUs, accelerator, image; the rest stays what
    `capsem pool start` defaults to when not given."""
    given = PoolConfig(size=3, memory_mb=2048, cpus=1, accel="tcg", image=None)
    args = build_parser().parse_args(["pool", "start", "--size=3", "--memory=2048", "--cpus=1", "--accel=tcg"])
    assert PoolConfig.from_args(args) == given
    assert PoolConfig.from_args(build_parser().parse_args(["pool", "start", *given.to_argv()])) == given
