"""What the scripts' command lines share: a parser whose help is the script's own docstring.

    p = cli.parser(__doc__)        # description: the first paragraph; epilog: the rest, as written
"""

import argparse


def parser(doc):
    """An ArgumentParser showing the script's docstring: its first paragraph above the options, the
    rest (usage examples, what it writes) below them, with the docstring's line breaks kept."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=first, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
