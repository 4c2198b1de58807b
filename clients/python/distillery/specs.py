from distillery_contract.specs import *  # noqa: F401,F403 (the job specs are the contract's: distillery_contract.specs)
