# A company's own BuildElement kind, as bst would load it (remex reads only mybuild.yaml).
from buildstream import BuildElement


class MyBuildElement(BuildElement):
    BST_MIN_VERSION = "2.0"


def setup():
    return MyBuildElement
