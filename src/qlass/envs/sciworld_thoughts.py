"""Short templated thoughts for ScienceWorld's gold actions (expert SFT data has no thoughts).

A thought restates the intent of the action it precedes, in plain words, so the agent learns the
``Thought: ...\\nAction: ...`` format without being shown information it could not see.
"""

from __future__ import annotations

import re

_TEMPLATES: list[tuple[str, str]] = [
    (r"^look around$", "I should look around to see what is here."),
    (r"^look at (.+)$", "I should look at the {0} more closely."),
    (r"^look in (.+)$", "I should check what is inside the {0}."),
    (r"^examine (.+)$", "I should examine the {0} to learn its state."),
    (r"^open door to (.+)$", "The {0} is next; I should make sure its door is open."),
    (r"^open (.+)$", "I need to open the {0}."),
    (r"^close (.+)$", "I should close the {0}."),
    (r"^go to (.+)$", "I should go to the {0}."),
    (r"^teleport to (.+)$", "I should go straight to the {0}."),
    (r"^focus on (.+)$", "The {0} is what the task is about, so I will focus on it."),
    (r"^pick up (.+)$", "I need to take the {0} with me."),
    (r"^(?:put down|drop) (.+)$", "I should put down the {0}."),
    (r"^move (.+) to (.+)$", "I should move the {0} to the {1}."),
    (r"^pour (.+) (?:in|into) (.+)$", "I should pour the {0} into the {1}."),
    (r"^dunk (.+) in (.+)$", "I should dunk the {0} in the {1}."),
    (r"^mix (.+)$", "Now I can mix the contents of the {0}."),
    (r"^(?:activate|turn on) (.+)$", "I should turn on the {0}."),
    (r"^(?:deactivate|turn off) (.+)$", "I should turn off the {0}."),
    (r"^connect (.+) to (.+)$", "I need to connect the {0} to the {1}."),
    (r"^disconnect (.+)$", "I should disconnect the {0}."),
    (r"^use (.+) on (.+)$", "I will use the {0} on the {1}."),
    (r"^read (.+)$", "I should read the {0}."),
    (r"^eat (.+)$", "I will eat the {0}."),
    (r"^flush (.+)$", "I should flush the {0}."),
    (r"^wait1?$", "I need to let some time pass."),
    (r"^inventory$", "I should check what I am carrying."),
    (r"^\d+$", "Several objects match; I choose option {0}."),
]
_COMPILED = [(re.compile(p), t) for p, t in _TEMPLATES]


def expert_thought(action: str) -> str:
    """A one-sentence thought for ``action``."""
    text = action.strip()
    for pattern, template in _COMPILED:
        m = pattern.match(text)
        if m:
            return template.format(*(m.groups() or (text,)))
    return f"Next I will {text}."
