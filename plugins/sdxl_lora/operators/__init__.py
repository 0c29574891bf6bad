"""Every operator of this project: SageMaker jobs a retried task finds again (jobs), the endpoint's Model,
EndpointConfig and Endpoint steps (endpoints), and the tuning job (tuning)."""
