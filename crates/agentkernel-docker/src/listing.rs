//! Listing the engine's containers, whatever names its states have.
//!
//! Podman's Docker-compatible list reports some states Docker's schema does
//! not have — `stopped` (the process has exited, Podman's own clean-up has
//! not run yet), `configured` — and bollard's typed listing rejects the whole
//! answer for one such container. The garbage collector and the warm pool
//! then saw *no* containers at all while any sandbox on the machine was
//! between those states (a `sandbox gc` that removed nothing and said
//! nothing). So when the typed answer does not decode, the same answer
//! (bollard hands it back, `json_data_content`) is read again with the state
//! as a plain string, in Docker's word where Podman has its own
//! ([`crate::inspect::docker_word`], which the inspect answer uses too).

use std::collections::HashMap;

use bollard::errors::Error as BollardError;
use bollard::models::ContainerSummary;
use bollard::query_parameters::ListContainersOptionsBuilder;
use serde::Deserialize;

use crate::Engine;

/// What agentkernel reads of a listed container.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Listed {
    #[serde(rename = "Names", default)]
    names: Option<Vec<String>>,
    #[serde(rename = "Labels", default)]
    labels: Option<HashMap<String, String>>,
    /// Docker's word for it: `running`, `created`, `exited`… (Podman's
    /// `stopped` reads as `exited`); a word neither engine is known to use
    /// is kept as it is.
    #[serde(rename = "State", default)]
    state: Option<String>,
}

impl Listed {
    /// Its name, without the API's leading `/`.
    pub fn name(&self) -> Option<String> {
        self.names
            .as_ref()?
            .first()
            .map(|n| n.trim_start_matches('/').to_string())
    }

    pub fn label(&self, key: &str) -> Option<&String> {
        self.labels.as_ref()?.get(key)
    }

    pub fn labels(&self) -> HashMap<String, String> {
        self.labels.clone().unwrap_or_default()
    }

    pub fn state(&self) -> &str {
        self.state.as_deref().unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.state() == "running"
    }
}

impl From<ContainerSummary> for Listed {
    fn from(c: ContainerSummary) -> Listed {
        Listed {
            names: c.names,
            labels: c.labels,
            state: c.state.map(|s| s.to_string()),
        }
    }
}

/// Every container, in any state, carrying all of `labels` (`key=value` each).
pub async fn containers_labelled(
    engine: &Engine,
    labels: Vec<String>,
) -> Result<Vec<Listed>, BollardError> {
    let filters = HashMap::from([("label".to_string(), labels)]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    match engine.docker.list_containers(Some(options)).await {
        Ok(list) => Ok(list.into_iter().map(Listed::from).collect()),
        Err(BollardError::JsonDataError { contents, .. }) => read_leniently(&contents),
        Err(e) => Err(e),
    }
}

/// A list answer read with its states as plain strings, in Docker's words.
fn read_leniently(answer: &str) -> Result<Vec<Listed>, BollardError> {
    let mut listed: Vec<Listed> = serde_json::from_str(answer)?;
    for container in &mut listed {
        if let Some(docker) = container
            .state
            .as_deref()
            .and_then(crate::inspect::docker_word)
        {
            container.state = Some(docker.to_string());
        }
    }
    Ok(listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Podman 4 answer (trimmed) with one container in its `stopped` state,
    /// which Docker's schema does not have.
    const PODMAN_ANSWER: &str = r#"[
      {"Id":"a1","Names":["/agentkernel-one"],"Image":"busybox","State":"running",
       "Status":"Up 2 seconds","Labels":{"agentkernel.managed":"true","agentkernel.kind":"run"}},
      {"Id":"b2","Names":["/agentkernel-two"],"Image":"busybox","State":"stopped",
       "Status":"Exited (0) 1 second ago","Labels":{"agentkernel.managed":"true"}},
      {"Id":"c3","Names":null,"State":"configured","Labels":null}
    ]"#;

    #[test]
    fn bollards_typed_listing_rejects_podmans_stopped_state() {
        // The reason this module exists: if bollard ever accepts it, the
        // lenient path is no longer needed.
        let typed = serde_json::from_str::<Vec<ContainerSummary>>(PODMAN_ANSWER);
        assert!(typed.is_err());
    }

    #[test]
    fn the_lenient_reading_keeps_every_container_and_its_state() {
        let listed = read_leniently(PODMAN_ANSWER).unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].name().as_deref(), Some("agentkernel-one"));
        assert!(listed[0].is_running());
        assert_eq!(
            listed[0].label("agentkernel.kind").map(String::as_str),
            Some("run")
        );
        assert_eq!(
            listed[1].state(),
            "exited",
            "Podman's stopped, in Docker's word"
        );
        assert!(!listed[1].is_running());
        assert_eq!(listed[2].state(), "created", "Podman's configured");
        assert_eq!(listed[2].name(), None);
        assert!(listed[2].labels().is_empty());
    }

    #[test]
    fn a_typed_summary_converts_with_the_same_state_words() {
        let summary: ContainerSummary =
            serde_json::from_str(r#"{"Names":["/x"],"State":"exited","Labels":{"k":"v"}}"#)
                .unwrap();
        let listed = Listed::from(summary);
        assert_eq!(listed.state(), "exited");
        assert_eq!(listed.name().as_deref(), Some("x"));
        assert_eq!(listed.label("k").map(String::as_str), Some("v"));
    }
}
