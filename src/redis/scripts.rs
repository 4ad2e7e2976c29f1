//! The Lua scripts, each loaded once and invoked by SHA (`EVALSHA`, falling
//! back to loading it on `NOSCRIPT`, which `redis::Script` does).

use redis::Script;

const COMMON: &str = include_str!("scripts/common.lua");

pub(crate) struct Scripts {
    pub(crate) reserve: Script,
    pub(crate) commit: Script,
    pub(crate) release: Script,
    pub(crate) renew: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with_common = |body: &str| Script::new(&[COMMON, body].concat());
        Scripts {
            reserve: with_common(include_str!("scripts/reserve.lua")),
            commit: with_common(include_str!("scripts/commit.lua")),
            release: with_common(include_str!("scripts/release.lua")),
            renew: with_common(include_str!("scripts/renew.lua")),
        }
    }
}
