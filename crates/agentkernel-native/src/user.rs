//! The image's `User` (`name`, `uid`, `name:group`, `uid:gid`) resolved
//! against the sandbox's own `/etc/passwd` and `/etc/group`, as Docker does.

use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// (name, gid, members)
fn groups(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolves with the files read from the sandbox's root.
pub fn resolve(user: Option<&str>) -> io::Result<Identity> {
    let passwd_text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group_text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_with(user, &passwd_text, &group_text)
}

fn resolve_with(user: Option<&str>, passwd_text: &str, group_text: &str) -> io::Result<Identity> {
    let users = passwd(passwd_text);
    let all_groups = groups(group_text);
    let spec = user.filter(|u| !u.is_empty()).unwrap_or("0");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let not_found = |what: &str, name: &str| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the image's user {what} '{name}' is not in its /etc/{}",
                if what == "group" { "group" } else { "passwd" }
            ),
        )
    };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| not_found("name", user_part))?,
        ),
    };
    let uid = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => e.uid,
        (None, Ok(uid)) => uid,
        (None, Err(_)) => return Err(not_found("name", user_part)),
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|(name, _, _)| name == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| not_found("group", g))?,
        },
        None => entry.map_or(0, |e| e.gid),
    };
    let groups = match (group_part, entry) {
        // An explicit group means exactly that group, as in Docker.
        (None, Some(e)) => all_groups
            .iter()
            .filter(|(_, _, members)| members.contains(&e.name))
            .map(|(_, gid, _)| *gid)
            .filter(|g| *g != gid)
            .collect(),
        _ => Vec::new(),
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.map_or_else(|| "/".to_string(), |e| e.home.clone()),
    })
}

/// Drops to the identity: supplementary groups, then gid, then uid.
/// Becomes `id`. `set_groups` is false in a rootless sandbox, whose user
/// namespace denies setgroups (the caller's own groups stay, unmapped).
pub fn switch(id: &Identity, set_groups: bool) -> io::Result<()> {
    let ctx = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    // SAFETY: the pointer and length describe `id.groups`.
    if set_groups && unsafe { libc::setgroups(id.groups.len(), id.groups.as_ptr()) } != 0 {
        return Err(ctx("setgroups"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(id.gid, id.gid, id.gid) } != 0 {
        return Err(ctx("setgid"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(id.uid, id.uid, id.uid) } != 0 {
        return Err(ctx("setuid"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\napp:x:1000:\ndocker:x:999:app\n";

    #[test]
    fn resolves_like_docker() {
        let root = resolve_with(None, PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let app = resolve_with(Some("app"), PASSWD, GROUP).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.clone()),
            (1000, 1000, vec![999])
        );
        let numeric = resolve_with(Some("4242"), PASSWD, GROUP).unwrap();
        assert_eq!(
            (numeric.uid, numeric.gid, numeric.home.as_str()),
            (4242, 0, "/")
        );
        let pair = resolve_with(Some("app:nogroup"), PASSWD, GROUP).unwrap();
        assert_eq!((pair.uid, pair.gid, pair.groups.len()), (1000, 65534, 0));
        assert!(resolve_with(Some("ghost"), PASSWD, GROUP).is_err());
        assert!(resolve_with(Some("app:ghosts"), PASSWD, GROUP).is_err());
    }
}
