"""Recipe normalisation and the cache keys derived from it."""

import pytest

from capsem_vm.errors import ImageError
from capsem_vm.image.recipe import BASE_PACKAGES, Recipe, load_recipe, make_recipe


def test_same_recipe_same_key():
    assert Recipe().rootfs_key() == Recipe().rootfs_key()
    assert Recipe(apt=("htop", "jq")).rootfs_key() == Recipe(apt=("jq", "htop", "jq")).rootfs_key()
    assert Recipe(pip=("rich==13.7.1",)).rootfs_key() == Recipe(pip=(" rich==13.7.1",)).rootfs_key()


def test_extra_package_changes_key():
    assert Recipe(apt=("htop",)).rootfs_key() != Recipe().rootfs_key()
    assert Recipe(pip=("rich",)).rootfs_key() != Recipe().rootfs_key()
    assert Recipe(pip=("rich",)).rootfs_key() != Recipe(apt=("rich",)).rootfs_key()


def test_base_package_as_extra_is_the_default_package_set():
    assert Recipe(apt=("curl",)).packages == Recipe().packages
    assert set(BASE_PACKAGES) <= set(Recipe(apt=("htop",)).packages)


def test_default_flag():
    assert Recipe().is_default
    assert not Recipe(apt=("htop",)).is_default


@pytest.mark.parametrize("bad", ["-oAPT::x=1", "Foo", "a b", "pkg;rm", ""])
def test_invalid_apt_names_rejected(bad):
    with pytest.raises(ImageError, match="invalid Debian package"):
        Recipe(apt=(bad,))


@pytest.mark.parametrize("bad", ["--index-url=http://evil", "-e .", "x$(id)", "a|b"])
def test_invalid_pip_requirements_rejected(bad):
    with pytest.raises(ImageError, match="invalid pip requirement"):
        Recipe(pip=(bad,))


def test_recipe_file_combines_with_options(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('apt = ["htop"]\npip = ["rich==13.7.1"]\n')
    r = make_recipe(apt=["jq"], pip=[], recipe_file=f)
    assert r.apt == ("htop", "jq") and r.pip == ("rich==13.7.1",)
    assert r.rootfs_key() == Recipe(apt=("jq", "htop"), pip=("rich==13.7.1",)).rootfs_key()


@pytest.mark.parametrize("text, message", [
    ("memory = 4\n", "unknown keys"),
    ('apt = "htop"\n', "must be a list"),
    ("apt = [\n", "cannot read recipe"),
])
def test_bad_recipe_files(tmp_path, text, message):
    f = tmp_path / "r.toml"
    f.write_text(text)
    with pytest.raises(ImageError, match=message):
        load_recipe(f)
